"""Embedding modules every model receives in its constructor (as TorchRec's): one interface, two homes.

- `PooledEmbedding`: rows come from the HierarchicalPS, one lookup per table per batch (the serving path;
  tables far bigger than memory).
- `LocalEmbedding`: rows live in `nn.EmbeddingBag` parameters (training, and the in-RAM speed limit).

Both map a SparseBatch to {table: [num_items, dim]} pooled rows, and give sequence tables as
[num_items, keys_per_item, dim]. Their results are equal for equal tables (tests/models/test_embedding.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recserve.errors import InvalidInputError
from recserve.models.specs import TableSpec
from recserve.ps.keys import unique_inverse
from recserve.ps.server import HierarchicalPS
from recserve.sparse import SparseBatch

PoolingMode = Literal["sum", "mean"]


def _require(batch: SparseBatch, tables: Sequence[TableSpec], owner: str) -> None:
    for table in tables:
        if table.name not in batch.keys:
            raise InvalidInputError(f"model '{owner}': sparse input lacks table '{table.name}'")


def _check_sequence(batch: SparseBatch, table: TableSpec, owner: str) -> None:
    expected = batch.num_items * table.keys_per_item
    if batch.keys[table.name].numel() != expected or not bool(
        (batch.lengths(table.name) == table.keys_per_item).all()
    ):
        raise InvalidInputError(
            f"model '{owner}': table '{table.name}' is a sequence of {table.keys_per_item} keys per item"
        )


class PooledEmbedding(nn.Module):
    """PS-backed embedding: one pooled lookup of all its tables (`HierarchicalPS.lookup_pooled_tables`);
    sequence tables deduplicate their keys, look each up once and expand."""

    def __init__(self, ps: HierarchicalPS, tables: Sequence[TableSpec], mode: PoolingMode = "sum",
                 owner: str = "model") -> None:
        super().__init__()
        self.ps, self.specs, self.mode, self.owner = ps, tuple(tables), mode, owner
        self._pooled_names = [t.name for t in self.specs if t.pooled]

    def _unique_rows(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unique, inverse = unique_inverse(np.ascontiguousarray(keys.cpu().numpy()))
        rows = self.ps.lookup_numpy(table, unique, assume_unique=True)
        return torch.from_numpy(rows), torch.from_numpy(inverse)

    def forward(self, batch: SparseBatch) -> dict[str, torch.Tensor]:
        _require(batch, self.specs, self.owner)
        names = self._pooled_names
        rows = self.ps.lookup_pooled_tables(  # every table in one call: see HierarchicalPS.lookup_pooled_tables
            names, [batch.keys[t].cpu().numpy() for t in names], [batch.offsets[t].cpu().numpy() for t in names],
            self.mode,
        )
        return {name: torch.from_numpy(pooled) for name, pooled in zip(names, rows, strict=True)}

    def sequence(self, batch: SparseBatch, table: TableSpec) -> torch.Tensor:
        _check_sequence(batch, table, self.owner)
        rows, inverse = self._unique_rows(table.name, batch.keys[table.name])
        return rows[inverse].view(batch.num_items, table.keys_per_item, table.dim)


class LocalEmbedding(nn.Module):
    """In-memory embedding tables as `nn.EmbeddingBag` parameters, keyed by table name."""

    def __init__(self, tables: Sequence[TableSpec], mode: PoolingMode = "sum", owner: str = "model") -> None:
        super().__init__()
        self.specs, self.mode, self.owner = tuple(tables), mode, owner
        self.tables = nn.ModuleDict({t.name: nn.EmbeddingBag(t.rows, t.dim, mode=mode) for t in tables})

    def forward(self, batch: SparseBatch) -> dict[str, torch.Tensor]:
        _require(batch, self.specs, self.owner)
        return {  # EmbeddingBag takes each bag's start; the last bag runs to the end of the keys
            spec.name: self.tables[spec.name](batch.keys[spec.name], batch.offsets[spec.name][:-1])
            for spec in self.specs
            if spec.pooled
        }

    def sequence(self, batch: SparseBatch, table: TableSpec) -> torch.Tensor:
        _check_sequence(batch, table, self.owner)
        weight = self.tables[table.name].weight
        return F.embedding(batch.keys[table.name], weight).view(batch.num_items, table.keys_per_item, table.dim)
