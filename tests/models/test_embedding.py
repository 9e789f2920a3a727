"""The PS-backed pooled embedding equals torch.nn.EmbeddingBag on the same full table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.models.embedding import LocalEmbedding, PooledEmbedding
from recserve.models.specs import TableSpec
from recserve.ps.server import HierarchicalPS
from recserve.sparse import SparseBatch
from tests.conftest import make_ps_config, make_table

ROWS, DIM = 500, 16


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pooled_embedding_equals_embedding_bag(tmp_path: Path, mode: str) -> None:
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    config = make_ps_config(tmp_path / "s", [make_table("t", DIM, dram_capacity_rows=100)], partitions=2)
    with HierarchicalPS.from_config(config) as ps:  # a DRAM tier of 100 rows: most keys come from RocksDB
        ps.import_table("t", np.arange(ROWS), weight.numpy())
        module = PooledEmbedding(ps, [TableSpec("t", ROWS, DIM, 3)], mode=mode)
        bag = torch.nn.EmbeddingBag.from_pretrained(weight, mode=mode)
        rng = np.random.default_rng(1)
        for _ in range(5):
            lengths = torch.from_numpy(rng.integers(0, 6, 64))  # empty bags included
            keys = torch.from_numpy(rng.zipf(1.3, int(lengths.sum())) % ROWS)  # many repeats
            batch = SparseBatch.from_lengths({"t": (keys, lengths)})
            expected = bag(keys, batch.offsets["t"][:-1])
            torch.testing.assert_close(module(batch)["t"], expected, rtol=1e-6, atol=1e-6)


def test_local_and_ps_sequences_agree(tmp_path: Path) -> None:
    spec = TableSpec("s", ROWS, DIM, 4, pooled=False)
    local = LocalEmbedding([spec])
    config = make_ps_config(tmp_path / "s", [make_table("s", DIM)], dram=False)
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("s", np.arange(ROWS), local.tables["s"].weight.detach().numpy())
        keys = torch.arange(12) * 7 % ROWS
        batch = SparseBatch.from_lengths({"s": (keys, [4, 4, 4])})
        remote = PooledEmbedding(ps, [spec]).sequence(batch, spec)
        assert remote.shape == (3, 4, DIM)
        torch.testing.assert_close(remote, local.sequence(batch, spec).detach())
