"""The dense parts of the eight reference models, built as their papers describe.

Every model takes its embedding module in the constructor (PS-backed for serving, local for training) and
maps (dense [num_items, dense_features] float32, SparseBatch) -> scores [num_items, num_tasks] in (0, 1).
Dense layers follow `device`; embeddings stay where their module keeps them.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from recserve.errors import InvalidInputError
from recserve.models.specs import ModelSpec
from recserve.sparse import SparseBatch


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ...; ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RecModel(nn.Module):
    """Input checks shared by every model; subclasses implement `scores`."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.embedding = embedding

    @property
    def device(self) -> torch.device:
        # parameters() walks every submodule (tens of microseconds a call); `.to()` keeps the Parameter objects
        # and swaps their data, so one kept reference always knows the device.
        if not hasattr(self, "_device_probe"):
            self._device_probe = (next(self.parameters()),)  # a tuple: not registered as a parameter
        return self._device_probe[0].device

    def forward(self, dense: torch.Tensor | None, sparse: SparseBatch) -> torch.Tensor:
        name, width = self.spec.name, self.spec.dense_features
        if dense is None:
            dense = torch.zeros(sparse.num_items, width)
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.float32:
            got = dense.dtype if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise InvalidInputError(f"model '{name}': dense must be a float32 tensor, got {got}")
        if dense.dim() != 2 or dense.shape[1] != width:
            raise InvalidInputError(f"model '{name}': dense must be [items, {width}], got {list(dense.shape)}")
        if dense.shape[0] != sparse.num_items:
            raise InvalidInputError(
                f"model '{name}': dense has {dense.shape[0]} items, sparse input has {sparse.num_items}"
            )
        if sparse.num_items == 0:
            return torch.empty(0, self.spec.num_tasks)
        return self.scores(dense.to(self.device), sparse)

    def pooled(self, sparse: SparseBatch) -> dict[str, torch.Tensor]:
        device = self.device
        return {name: rows.to(device) for name, rows in self.embedding(sparse).items()}

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        raise NotImplementedError


class DLRM(RecModel):
    """RMC1-3: bottom MLP on dense features, concatenated with every pooled table, top MLP."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        self.bottom = mlp([spec.dense_features, *spec.bottom_mlp], final_activation=True)
        joined = spec.bottom_mlp[-1] + sum(t.dim for t in spec.tables)
        self.top = mlp([joined, *spec.top_mlp])

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        pooled = self.pooled(sparse)
        joined = torch.cat([self.bottom(dense), *(pooled[t.name] for t in self.spec.tables)], dim=1)
        return torch.sigmoid(self.top(joined))


class NCF(RecModel):
    """Neural collaborative filtering: GMF (user x item) fused with an MLP over [user, item]."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        dim = spec.tables[0].dim
        self.mlp = mlp([2 * dim, *spec.top_mlp], final_activation=True)
        self.predict = nn.Linear(dim + spec.top_mlp[-1], 1)

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        p = self.pooled(sparse)
        n = self.spec.name
        gmf = p[f"{n}_user_gmf"] * p[f"{n}_item_gmf"]
        deep = self.mlp(torch.cat([p[f"{n}_user_mlp"], p[f"{n}_item_mlp"]], dim=1))
        return torch.sigmoid(self.predict(torch.cat([gmf, deep], dim=1)))


class WideAndDeep(RecModel):
    """A linear (wide) model on the dense features plus a deep MLP on dense + pooled embeddings."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        self.wide = nn.Linear(spec.dense_features, 1)
        self.deep = mlp([spec.dense_features + sum(t.dim for t in spec.tables), *spec.top_mlp])

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        pooled = self.pooled(sparse)
        deep_in = torch.cat([dense, *(pooled[t.name] for t in self.spec.tables)], dim=1)
        return torch.sigmoid(self.wide(dense) + self.deep(deep_in))


class MultiTaskWideAndDeep(RecModel):
    """Wide&Deep with a shared trunk and one head per task (e.g. click, like, share)."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        trunk_in = spec.dense_features + sum(t.dim for t in spec.tables)
        self.trunk = mlp([trunk_in, *spec.bottom_mlp], final_activation=True)
        self.heads = nn.ModuleList(mlp([spec.bottom_mlp[-1], *spec.top_mlp]) for _ in range(spec.num_tasks))
        self.wide = nn.Linear(spec.dense_features, spec.num_tasks)

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        pooled = self.pooled(sparse)
        shared = self.trunk(torch.cat([dense, *(pooled[t.name] for t in self.spec.tables)], dim=1))
        return torch.sigmoid(torch.cat([head(shared) for head in self.heads], dim=1) + self.wide(dense))


class DIN(RecModel):
    """Deep Interest Network: an attention unit weighs each behaviour by its relevance to the candidate ad."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        n = spec.name
        self.behaviours = [t.name for t in spec.tables if t.name.startswith(f"{n}_behaviour")]
        dim = spec.tables[0].dim
        hidden, out = spec.bottom_mlp
        self.attention = nn.Sequential(nn.Linear(4 * dim, hidden), nn.PReLU(), nn.Linear(hidden, out))
        self.top = mlp([4 * dim, *spec.top_mlp])

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        p = self.pooled(sparse)
        n = self.spec.name
        ad = p[f"{n}_ad"]
        behaviours = torch.stack([p[b] for b in self.behaviours], dim=1)  # [items, B, dim]
        ad_b = ad.unsqueeze(1).expand_as(behaviours)
        weights = self.attention(torch.cat([behaviours, ad_b, behaviours * ad_b, behaviours - ad_b], dim=2))
        interest = (weights * behaviours).sum(dim=1)  # DIN keeps raw weights: no softmax, intensity matters
        logits = self.top(torch.cat([p[f"{n}_profile"], interest, ad, p[f"{n}_context"]], dim=1))
        return torch.softmax(logits, dim=1)[:, 1:]


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by an attention score (DIEN's interest evolution)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inputs = nn.Linear(dim, 3 * dim)
        self.hidden = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        xr, xz, xn = self.inputs(x).chunk(3, dim=1)
        hr, hz, hn = self.hidden(h).chunk(3, dim=1)
        reset = torch.sigmoid(xr + hr)
        update = torch.sigmoid(xz + hz) * attention  # the attention-gated update
        candidate = torch.tanh(xn + reset * hn)
        return (1 - update) * h + update * candidate


class DIEN(RecModel):
    """Deep Interest Evolution Network: GRU interest extractor, then an AUGRU driven by attention to the ad."""

    def __init__(self, spec: ModelSpec, embedding: nn.Module) -> None:
        super().__init__(spec, embedding)
        dim = spec.tables[0].dim
        self.history = spec.table(f"{spec.name}_behaviour")
        self.extractor = nn.GRU(dim, dim, batch_first=True)
        self.attention = nn.Linear(dim, dim, bias=False)
        self.evolution = AUGRUCell(dim)
        self.top = mlp([4 * dim, *spec.top_mlp])

    def scores(self, dense: torch.Tensor, sparse: SparseBatch) -> torch.Tensor:
        p = self.pooled(sparse)
        n = self.spec.name
        ad = p[f"{n}_ad"]
        sequence = self.embedding.sequence(sparse, self.history).to(self.device)  # [items, T, dim]
        interests, _ = self.extractor(sequence)
        relevance = torch.softmax((interests * self.attention(ad).unsqueeze(1)).sum(dim=2), dim=1)  # [items, T]
        h = torch.zeros_like(ad)
        for t in range(interests.shape[1]):
            h = self.evolution(interests[:, t], h, relevance[:, t : t + 1])
        logits = self.top(torch.cat([p[f"{n}_profile"], h, ad, p[f"{n}_context"]], dim=1))
        return torch.softmax(logits, dim=1)[:, 1:]


NETWORKS: dict[str, type[RecModel]] = {
    "dlrm": DLRM, "ncf": NCF, "wnd": WideAndDeep, "mtwnd": MultiTaskWideAndDeep, "din": DIN, "dien": DIEN,
}
