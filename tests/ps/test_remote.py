"""RemoteTier: a worker's view of the owner's RocksDB tier, over a real pipe and a real store."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recserve.errors import TierUnavailableError
from recserve.ps.remote import RemoteTier, serve_lookups
from recserve.ps.rocks import RocksTier
from recserve.ps.server import HierarchicalPS
from tests.conftest import make_ps_config, make_table, rows_for

DIM = 8


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[HierarchicalPS]:
    config = make_ps_config(tmp_path / "store", [make_table(dim=DIM)], dram=False)
    with HierarchicalPS.from_config(config) as ps:
        ps.insert("t", np.arange(100), rows_for(np.arange(100), DIM))
        yield ps


def connect(tier: RocksTier) -> tuple[RemoteTier, threading.Thread]:
    mine, theirs = multiprocessing.Pipe()
    server = threading.Thread(target=serve_lookups, args=(tier, theirs), daemon=True)
    server.start()
    return RemoteTier(tier.name, mine), server


def test_lookups_cross_the_pipe(owner: HierarchicalPS) -> None:
    remote, _ = connect(owner.tiers[0])
    keys = np.array([5, 500, 99, -1], dtype=np.int64)
    result = remote.lookup("t", keys)
    assert result.found.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(result.rows[result.found], rows_for(np.array([5, 99]), DIM))
    assert remote.name == "rocksdb" and remote.stats() == {} and remote.update_token("t") is None


def test_a_ps_over_dram_and_the_remote_tier_is_exact_and_promotes(owner: HierarchicalPS, tmp_path: Path) -> None:
    from recserve.config import DramTierConfig
    from recserve.ps.dram import DramTier

    remote, _ = connect(owner.tiers[0])
    tables = [make_table(dim=DIM, dram_capacity_rows=16)]
    with HierarchicalPS(tables, [DramTier.create(tables, DramTierConfig(num_partitions=2)), remote]) as worker:
        keys = np.array([3, 7, 3, 1000], dtype=np.int64)
        rows = worker.lookup_numpy("t", keys)
        np.testing.assert_array_equal(rows[:3], rows_for(keys[:3], DIM))
        np.testing.assert_array_equal(rows[3], np.zeros(DIM, dtype=np.float32))
        worker.lookup_numpy("t", keys)
        counts = worker.counts()["t"]
        assert counts.hits == {"dram": 2, "rocksdb": 2} and counts.not_found == 2


def test_errors_travel_back_named(owner: HierarchicalPS) -> None:
    remote, _ = connect(owner.tiers[0])
    with pytest.raises(TierUnavailableError, match="rocksdb: .*nope"):
        remote.lookup("nope", np.array([1], dtype=np.int64))
    assert remote.lookup("t", np.array([1], dtype=np.int64)).found.tolist() == [True]  # still serving


def test_writes_are_refused(owner: HierarchicalPS) -> None:
    remote, server = connect(owner.tiers[0])
    with pytest.raises(TierUnavailableError, match="read-only view"):
        remote.insert("t", np.array([1], dtype=np.int64), rows_for(np.array([1]), DIM))
    with pytest.raises(TierUnavailableError, match="read-only view"):
        remote.begin_update("t")
    remote.close()
    server.join(5)
    assert not server.is_alive()  # the serving loop ends when its worker goes


def test_a_gone_owner_makes_the_tier_unavailable() -> None:
    mine, theirs = multiprocessing.Pipe()
    remote = RemoteTier("rocksdb", mine)
    theirs.close()
    with pytest.raises(TierUnavailableError, match="rocksdb: the owning process is gone"):
        remote.lookup("t", np.array([1], dtype=np.int64))
