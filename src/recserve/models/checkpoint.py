"""Model checkpoints: dense weights as a torch state_dict, sparse tables in the PS's import formats.

    folder/model.json          {"model": "rmc1", "preset": "tiny", "num_tasks": 1}
    folder/dense.pt            state_dict of the dense layers (no embedding tables)
    folder/sparse/<table>/     HugeCTR key + emb_vector files, one folder per table

A trained model (local nn.EmbeddingBag tables) and a served one (tables in the PS) save the same layout, so
training output loads straight into serving. `split_state_dict` does the same split for a bare state_dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recserve.errors import MalformedFileError
from recserve.models import build_model
from recserve.models.embedding import LocalEmbedding
from recserve.models.networks import RecModel
from recserve.models.specs import ModelSpec, model_spec
from recserve.ps import formats
from recserve.ps.server import HierarchicalPS

TABLE_PREFIX = "embedding.tables."


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense weights, {table: [rows, dim] weight}) from a state_dict of a model with local tables."""
    dense, tables = {}, {}
    for key, value in state.items():
        if key.startswith(TABLE_PREFIX) and key.endswith(".weight"):
            tables[key[len(TABLE_PREFIX) : -len(".weight")]] = value
        else:
            dense[key] = value
    return dense, tables


def save_checkpoint(model: RecModel, folder: Path, preset: str, ps: HierarchicalPS | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dense, tables = split_state_dict(model.state_dict())
    torch.save(dense, folder / "dense.pt")
    for table in model.spec.tables:
        if isinstance(model.embedding, LocalEmbedding):
            keys, rows = np.arange(table.rows, dtype=np.int64), tables[table.name].detach().cpu().numpy()
        else:
            if ps is None:
                raise ValueError("a PS-backed model needs its parameter server to save its tables")
            keys, rows = ps.export_table(table.name)
        formats.write_hugectr(folder / "sparse" / table.name, keys, rows)
    meta = {"model": model.spec.name, "preset": preset, "num_tasks": model.spec.num_tasks}
    (folder / "model.json").write_text(json.dumps(meta))


def load_checkpoint(folder: Path, ps: HierarchicalPS) -> RecModel:
    """Import the tables of a checkpoint into `ps` and return the PS-backed model with its dense weights."""
    spec = checkpoint_spec(folder)
    import_tables(folder, spec, ps)
    return load_dense(build_model(spec, ps), folder)


def import_tables(folder: Path, spec: ModelSpec, ps: HierarchicalPS,
                  progress: Callable[[int], None] | None = None) -> None:
    """Load every table of a checkpoint into `ps` (checked against the PS's table configs first)."""
    for table in spec.tables:
        source = formats.read_hugectr(folder / "sparse" / table.name, table.dim)
        formats.validate(source, ps.table(table.name))
        ps.bulk_load(table.name, formats.as_int64_keys(source), source.rows, progress)


def load_dense(model: RecModel, folder: Path) -> RecModel:
    """Load a checkpoint's dense weights (weights only: no code runs from the file) into `model`."""
    path = folder / "dense.pt"
    try:
        dense = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(dense)
    except OSError as error:
        raise MalformedFileError(f"{path}: cannot read: {error}") from None
    except (RuntimeError, ValueError, TypeError) as error:  # not a state_dict, or not this model's
        raise MalformedFileError(f"{path}: does not fit model '{model.spec.name}': {error}") from None
    return model


def checkpoint_spec(folder: Path) -> ModelSpec:
    try:
        meta = json.loads((folder / "model.json").read_text())
        return model_spec(meta["model"], meta["preset"], meta["num_tasks"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MalformedFileError(f"{folder / 'model.json'}: not a recserve checkpoint: {error}") from None
