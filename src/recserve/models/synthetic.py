"""Synthetic tables and queries for the reference models: power-law keys, seeded everything."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from recserve.models.specs import ModelSpec
from recserve.ps.server import HierarchicalPS
from recserve.sparse import SparseBatch
from recserve.synthetic import ZipfKeys, random_rows


def write_tables(ps: HierarchicalPS, spec: ModelSpec, seed: int = 0, progress: bool = True) -> None:
    """Random rows for every table of the model, written into the PS (RocksDB bulk import when present)."""
    total = sum(t.rows for t in spec.tables)
    with tqdm(total=total, unit="rows", desc=f"tables of {spec.name}", disable=not progress) as bar:
        for i, table in enumerate(spec.tables):
            rows = random_rows(table.rows, table.dim, seed=seed * 1000 + i)
            ps.bulk_load(table.name, np.arange(table.rows, dtype=np.int64), rows, bar.update)


def table_rows(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The same rows `write_tables` writes, for building a local twin of a PS-backed model."""
    return {t.name: random_rows(t.rows, t.dim, seed=seed * 1000 + i) for i, t in enumerate(spec.tables)}


@dataclass(frozen=True, slots=True)
class Query:
    dense: torch.Tensor  # [num_items, dense_features] float32
    sparse: SparseBatch


class QueryGenerator:
    """Queries of N candidate items: Zipf(alpha) keys per table, uniform dense features in [0, 1)."""

    def __init__(self, spec: ModelSpec, alpha: float = 1.05, seed: int = 0) -> None:
        self.spec = spec
        self._rng = np.random.default_rng(seed)
        samplers: dict[int, ZipfKeys] = {}
        self._keys = {}
        for i, table in enumerate(spec.tables):
            # tables of equal size share one popularity curve but not its order of ids
            base = samplers.setdefault(table.rows, ZipfKeys(table.rows, alpha, seed=seed))
            self._keys[table.name] = (base, np.random.default_rng(seed + i + 1).permutation(table.rows))

    def keys(self, table: str, count: int) -> np.ndarray:
        """`count` keys of one table, drawn independently from its Zipf popularity."""
        base, ids = self._keys[table]
        return ids[base.sample(count)]

    def query(self, num_items: int) -> Query:
        features = {}
        for table in self.spec.tables:
            keys = self.keys(table.name, num_items * table.keys_per_item)
            lengths = np.full(num_items, table.keys_per_item, dtype=np.int64)
            features[table.name] = (torch.from_numpy(keys), torch.from_numpy(lengths))
        dense = torch.from_numpy(self._rng.random((num_items, self.spec.dense_features), dtype=np.float32))
        return Query(dense=dense, sparse=SparseBatch.from_lengths(features, name=self.spec.name))
