"""Readers of embedding tables from the formats users have, each checked before anything is written.

- HugeCTR sparse model folder: `key` (raw int64) and `emb_vector` (raw float32, dim per row) files.
- numpy: a `.npy` of int64 keys and a `.npy` of [n, dim] floats.
- torch: a state_dict / `.pt` holding a [n, dim] weight tensor; row i is key i, or keys from a key map.

Files are memory-mapped, not read whole: a 4 GB table imports in bounded memory. Nothing here runs code from
a file: numpy loads with allow_pickle=False and torch with weights_only=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.config import TableConfig
from recserve.errors import MalformedFileError, NotFoundError


@dataclass(frozen=True, slots=True)
class TableSource:
    """Rows to import, with where they came from (named in every error)."""

    keys: np.ndarray  # [num_rows] int64, may be a memory map
    rows: np.ndarray  # [num_rows, dim] floating, may be a memory map
    origin: str


def _existing(path: Path) -> Path:
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or folder")
    return path


def read_hugectr(folder: Path, dim: int) -> TableSource:
    """A HugeCTR sparse model folder; `dim` comes from the config since the files don't record it."""
    key_file, vector_file = _existing(folder / "key"), _existing(folder / "emb_vector")
    key_bytes, vector_bytes = key_file.stat().st_size, vector_file.stat().st_size
    if key_bytes % 8:
        raise MalformedFileError(f"{key_file}: {key_bytes} bytes is not a whole number of int64 keys (truncated?)")
    if vector_bytes % 4:
        raise MalformedFileError(
            f"{vector_file}: {vector_bytes} bytes is not a whole number of float32 values (truncated?)"
        )
    num_keys, num_values = key_bytes // 8, vector_bytes // 4
    if num_values != num_keys * dim:
        hint = (
            f"rows of dim {num_values // num_keys}, but the table has dim {dim}"
            if num_keys and num_values % num_keys == 0
            else "truncated or mismatched files"
        )
        raise MalformedFileError(
            f"{vector_file}: holds {num_values} float32 values, expected {num_keys} keys x dim {dim} = "
            f"{num_keys * dim}: {hint}"
        )
    keys = _memmap(key_file, np.int64, (num_keys,))
    rows = _memmap(vector_file, np.float32, (num_keys, dim))
    return TableSource(keys=keys, rows=rows, origin=str(folder))


def _memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def read_npy(keys_path: Path, rows_path: Path) -> TableSource:
    keys = _load_npy(keys_path)
    rows = _load_npy(rows_path)
    if keys.ndim != 1:
        raise MalformedFileError(f"{keys_path}: keys must be 1-D, got shape {keys.shape}")
    if rows.ndim != 2 or rows.shape[0] != keys.shape[0]:
        raise MalformedFileError(
            f"{rows_path}: rows must be [{keys.shape[0]}, dim] to match {keys_path}, got shape {rows.shape}"
        )
    return TableSource(keys=keys, rows=rows, origin=f"{keys_path} + {rows_path}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(_existing(path), mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise MalformedFileError(f"{path}: not a readable .npy array: {error}") from None


def _load_torch(path: Path) -> object:
    import torch

    try:
        return torch.load(_existing(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a bad file; all mean "not a usable file"
        raise MalformedFileError(f"{path}: not a readable torch file: {error}") from None


def read_torch_state_dict(path: Path) -> dict:
    """A state_dict (name -> tensor), loaded without running code from the file."""
    import torch

    loaded = _load_torch(path)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise MalformedFileError(f"{path}: expected a state_dict of tensors, got {type(loaded).__name__}")
    return loaded


def read_torch(path: Path, tensor: str | None = None, key_map: Path | None = None) -> TableSource:
    """A tensor or state_dict file. `tensor` names the weight when the file holds several 2-D tensors."""
    import torch

    weight = _pick_tensor(path, _load_torch(path), tensor)
    rows = weight.detach().numpy() if weight.dtype != torch.bfloat16 else weight.float().numpy()
    if key_map is None:
        keys = np.arange(rows.shape[0], dtype=np.int64)
    else:
        keys = _load_npy(key_map)
        if keys.shape != (rows.shape[0],):
            raise MalformedFileError(f"{key_map}: key map must hold {rows.shape[0]} keys, got shape {keys.shape}")
    return TableSource(keys=keys, rows=rows, origin=str(path))


def _pick_tensor(path: Path, loaded: object, name: str | None) -> object:
    import torch

    if isinstance(loaded, torch.Tensor):
        candidates = {"": loaded}
    elif isinstance(loaded, dict):
        candidates = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor) and v.ndim == 2}
    else:
        raise MalformedFileError(f"{path}: expected a tensor or a state_dict, got {type(loaded).__name__}")
    if name is not None:
        if name not in candidates:
            raise NotFoundError(f"{path}: no 2-D tensor '{name}' (2-D tensors: {', '.join(candidates) or 'none'})")
        return candidates[name]
    if len(candidates) != 1:
        raise MalformedFileError(
            f"{path}: holds {len(candidates)} 2-D tensors ({', '.join(candidates) or 'none'}); name one with --tensor"
        )
    return next(iter(candidates.values()))


def validate(source: TableSource, table: TableConfig) -> None:
    """Refuse a source that does not fit the table: dtypes, dim, duplicate keys."""
    keys, rows = source.keys, source.rows
    if keys.dtype.kind not in "iu":
        raise MalformedFileError(f"{source.origin}: keys must be integers (int64), got dtype {keys.dtype}")
    if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
        raise MalformedFileError(f"{source.origin}: key {int(keys.max())} does not fit in int64")
    if rows.dtype.kind != "f":
        raise MalformedFileError(f"{source.origin}: rows must be floating point, got dtype {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != table.dim:
        raise MalformedFileError(
            f"{source.origin}: rows have shape {rows.shape}, table '{table.name}' has dim {table.dim}"
        )
    ordered = np.sort(np.asarray(keys, dtype=np.int64))
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        raise MalformedFileError(
            f"{source.origin}: {repeated.size} duplicate keys, e.g. key {int(ordered[repeated[0]])}"
        )


def as_int64_keys(source: TableSource) -> np.ndarray:
    return source.keys if source.keys.dtype == np.int64 else np.asarray(source.keys, dtype=np.int64)


def write_hugectr(folder: Path, keys: np.ndarray, rows: np.ndarray) -> None:
    """Write a table as a HugeCTR sparse model folder (the export side of `read_hugectr`)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(keys, dtype=np.int64).tofile(folder / "key")
    np.ascontiguousarray(rows, dtype=np.float32).tofile(folder / "emb_vector")
