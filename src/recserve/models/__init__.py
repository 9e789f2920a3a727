"""The eight DeepRecInfra reference models as nn.Modules over the parameter server."""

from __future__ import annotations

import torch

from recserve.config import RowDtype, TableConfig
from recserve.errors import NotFoundError
from recserve.models.embedding import LocalEmbedding, PooledEmbedding
from recserve.models.networks import NETWORKS, RecModel
from recserve.models.specs import MODEL_NAMES, ModelSpec, model_spec
from recserve.ps.server import HierarchicalPS

__all__ = ["MODEL_NAMES", "ModelSpec", "RecModel", "build_model", "model_spec", "table_configs"]


def build_model(spec: ModelSpec, ps: HierarchicalPS | None = None, seed: int = 0) -> RecModel:
    """The model with seeded dense weights; embeddings from `ps`, or local `nn.EmbeddingBag`s without one.

    The dense weights depend on the seed only, not on where the embeddings live.
    """
    if ps is None:
        embedding = LocalEmbedding(spec.tables, owner=spec.name)
    else:
        missing = [t.name for t in spec.tables if t.name not in ps.tables]
        if missing:
            raise NotFoundError(f"model '{spec.name}': the parameter server lacks tables {missing[:5]}")
        embedding = PooledEmbedding(ps, spec.tables, owner=spec.name)
    torch.manual_seed(seed)
    return NETWORKS[spec.kind](spec, embedding).eval()


def table_configs(spec: ModelSpec, dram_fraction: float = 1.0, dtype: RowDtype = "float32") -> list[TableConfig]:
    """PS table configs for a model's tables, rows stored as `dtype`, the DRAM tier holding `dram_fraction` of
    each."""
    return [
        TableConfig(name=t.name, dim=t.dim, dtype=dtype, dram_capacity_rows=max(1, int(t.rows * dram_fraction)))
        for t in spec.tables
    ]


