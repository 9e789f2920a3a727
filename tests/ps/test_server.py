"""HierarchicalPS: exact lookups across the DRAM and RocksDB tiers, promotion, writes, stats, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.errors import InvalidInputError, NotFoundError
from recserve.ps.server import HierarchicalPS
from tests.conftest import make_ps_config, make_table, replay_against_dict, rows_for

DIM = 8


def test_lookup_is_exact_through_a_small_dram_tier(ps: HierarchicalPS) -> None:
    keys = np.arange(200, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM))
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = rng.integers(0, 200, 64)
        np.testing.assert_array_equal(ps.lookup("t", batch).numpy(), rows_for(batch, DIM))
    stats = ps.stats().tables["t"]
    dram, rocks = stats.tiers["dram"], stats.tiers["rocksdb"]
    assert rocks.hits == dram.misses  # every DRAM miss was found below
    assert dram.held.rows <= dram.held.capacity_rows
    assert dram.held.evictions > 0


def test_rows_found_below_are_promoted_and_then_hit_in_dram(ps: HierarchicalPS) -> None:
    keys = np.arange(10, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM))
    ps.lookup("t", keys[:4])
    ps.lookup("t", keys[:4])
    tiers = ps.stats().tables["t"].tiers
    assert (tiers["dram"].hits, tiers["dram"].misses) == (4, 4)
    assert tiers["rocksdb"].hits == 4
    assert sorted(ps.tiers[0].table("t").held_keys().tolist()) == [0, 1, 2, 3]


def test_keys_found_nowhere_get_the_default_row_and_are_counted(tmp_path: Path) -> None:
    table = make_table(dram_capacity_rows=16, default_value=[float(i) for i in range(DIM)])
    with HierarchicalPS.from_config(make_ps_config(tmp_path / "s", [table])) as ps:
        ps.insert("t", [1], rows_for(np.array([1]), DIM))
        out = ps.lookup("t", [1, 5, 5, 6]).numpy()
        np.testing.assert_array_equal(out[0], rows_for(np.array([1]), DIM)[0])
        np.testing.assert_array_equal(out[1:], np.tile(np.arange(DIM, dtype=np.float32), (3, 1)))
        assert ps.stats().tables["t"].not_found == 2  # unique keys


def test_duplicate_keys_return_one_row_each_in_order(ps: HierarchicalPS) -> None:
    keys = np.array([3, 1, 3, 3, 2, 1], dtype=np.int64)
    ps.insert("t", np.array([1, 2, 3]), rows_for(np.array([1, 2, 3]), DIM))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))
    assert ps.stats().tables["t"].unique_keys == 3


def test_insert_writes_both_tiers_and_update_refreshes_only_held_rows(ps: HierarchicalPS) -> None:
    keys = np.arange(6, dtype=np.int64)
    ps.insert("t", keys, rows_for(keys, DIM, version=1))
    dram, rocks = ps.tiers
    assert dram.lookup("t", keys).found.all() and rocks.lookup("t", keys).found.all()
    dram.evict("t", keys[3:])
    ps.update("t", keys, rows_for(keys, DIM, version=2))
    assert dram.lookup("t", keys).found.tolist() == [True] * 3 + [False] * 3  # no new rows from updates
    np.testing.assert_array_equal(rocks.lookup("t", keys).rows, rows_for(keys, DIM, version=2))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))


def test_repeated_keys_in_one_write_keep_the_last_row(ps: HierarchicalPS) -> None:
    keys = np.array([7, 7, 8], dtype=np.int64)
    rows = np.stack([rows_for(np.array([7]), DIM, 1)[0], rows_for(np.array([7]), DIM, 2)[0],
                     rows_for(np.array([8]), DIM, 1)[0]])
    ps.insert("t", keys, rows)
    np.testing.assert_array_equal(ps.lookup("t", [7]).numpy()[0], rows[1])
    np.testing.assert_array_equal(ps.tiers[1].lookup("t", np.array([7])).rows[0], rows[1])


def test_import_replaces_the_table_and_drops_stale_dram_rows(ps: HierarchicalPS) -> None:
    keys = np.arange(10, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM, version=1))
    ps.lookup("t", keys)  # now in DRAM
    ps.import_table("t", keys[:5], rows_for(keys[:5], DIM, version=2))
    np.testing.assert_array_equal(ps.lookup("t", keys[:5]).numpy(), rows_for(keys[:5], DIM, version=2))
    assert (ps.lookup("t", keys[5:]).numpy() == 0).all()  # gone with the old import


def test_empty_batch_returns_an_empty_tensor(ps: HierarchicalPS) -> None:
    out = ps.lookup("t", np.array([], dtype=np.int64))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (0, DIM) and out.dtype == torch.float32
    assert tuple(ps.lookup("t", []).shape) == (0, DIM)


def test_bad_input_is_refused_and_leaves_the_store_as_it_was(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    ps.insert("t", keys, rows_for(keys, DIM))
    with pytest.raises(NotFoundError, match=r"unknown table 'nope' \(known: t\)"):
        ps.lookup("nope", keys)
    with pytest.raises(InvalidInputError, match="got dtype float32"):
        ps.lookup("t", keys.astype(np.float32))
    with pytest.raises(InvalidInputError, match=r"got shape \(2, 2\)"):
        ps.lookup("t", keys.reshape(2, 2))
    with pytest.raises(InvalidInputError, match=r"shape \(4, 8\) for 4 keys, got \(4, 9\)"):
        ps.insert("t", keys, np.zeros((4, DIM + 1), np.float32))
    with pytest.raises(InvalidInputError, match="floating point"):
        ps.update("t", keys, np.zeros((4, DIM), np.int64))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))


def test_works_with_only_the_persistent_tier(tmp_path: Path) -> None:
    config = make_ps_config(tmp_path / "s", [make_table()], dram=False)
    with HierarchicalPS.from_config(config) as ps:
        ps.update("t", [1, 2], rows_for(np.array([1, 2]), DIM))  # the last tier takes every update
        np.testing.assert_array_equal(ps.lookup("t", [2, 1]).numpy(), rows_for(np.array([2, 1]), DIM))
        assert [t.name for t in ps.tiers] == ["rocksdb"]


write_ops = st.tuples(
    st.sampled_from(["insert", "update", "lookup", "evict"]),
    st.lists(st.integers(0, 30), min_size=1, max_size=12),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(write_ops, min_size=1, max_size=25))
def test_ps_behaves_like_a_dict(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    """Whatever the DRAM tier evicts, the PS answers like a dict of the last rows written."""
    store = tmp_path_factory.mktemp("store")
    config = make_ps_config(store, [make_table(dram_capacity_rows=6)], partitions=2, target=0.5)
    with HierarchicalPS.from_config(config) as ps:
        replay_against_dict(ps, "t", ops, DIM)


def test_float16_tables_store_half_in_both_tiers_and_return_float32(tmp_path: Path) -> None:
    config = make_ps_config(tmp_path / "s", [make_table(dtype="float16", dram_capacity_rows=8)], partitions=2)
    keys = np.arange(40, dtype=np.int64)
    rows = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float32)
    expected = rows.astype(np.float16).astype(np.float32)
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("t", keys, rows)
        for _ in range(2):  # first from RocksDB, then partly from DRAM after promotion
            out = ps.lookup("t", keys[:10])
            assert out.dtype == torch.float32
            np.testing.assert_array_equal(out.numpy(), expected[:10])
        assert ps.stats().tables["t"].tiers["dram"].hits > 0


def test_a_promotion_never_lands_over_a_newer_update(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM, version=1))
    dram = ps.tiers[0]
    token = dram.update_token("t")  # a lookup starts and reads version 1 from RocksDB ...
    ps.update("t", keys, rows_for(keys, DIM, version=2))  # ... an update lands meanwhile ...
    dram.insert("t", keys, rows_for(keys, DIM, version=1), unless_updated_since=token)  # ... then it promotes
    assert not dram.lookup("t", keys).found.any()  # the stale promotion was dropped
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))


def test_an_update_during_a_lookup_is_not_undone_by_its_promotion(tmp_path: Path) -> None:
    """The lookup reads RocksDB, an update lands, then the lookup promotes: the promotion must be dropped."""
    import threading

    from recserve.config import DramTierConfig, RocksTierConfig
    from recserve.ps.dram import DramTier
    from recserve.ps.rocks import RocksTier

    read_done, update_done = threading.Event(), threading.Event()

    class PausingRocksTier(RocksTier):  # the real tier, paused between its read and the caller's promotion
        pause = False

        def lookup(self, table: str, keys: np.ndarray):
            result = super().lookup(table, keys)
            if self.pause:
                read_done.set()
                update_done.wait(timeout=60)
            return result

    table = make_table(dram_capacity_rows=16)
    rocks = PausingRocksTier(RocksTierConfig(path=tmp_path / "s"), [table])
    dram = DramTier.create([table], DramTierConfig(num_partitions=2))
    keys = np.arange(4, dtype=np.int64)
    with HierarchicalPS([table], [dram, rocks]) as ps:
        ps.import_table("t", keys, rows_for(keys, DIM, version=1))
        rocks.pause = True
        seen = {}
        reader = threading.Thread(target=lambda: seen.setdefault("rows", ps.lookup("t", keys).numpy()))
        reader.start()
        assert read_done.wait(timeout=60)
        rocks.pause = False
        ps.update("t", keys, rows_for(keys, DIM, version=2))
        update_done.set()
        reader.join(timeout=60)
        np.testing.assert_array_equal(seen["rows"], rows_for(keys, DIM, version=1))  # read before the update
        assert not dram.lookup("t", keys).found.any()  # its promotion was dropped
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))
