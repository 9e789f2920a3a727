"""How a table's rows are stored: float32, float16 or bfloat16 (`TableConfig.dtype`); always handed out as float32.

The DRAM tier and RocksDB keep 16-bit rows as their raw bits (uint16): the numba kernels copy rows without
knowing their format, and numpy has no bfloat16 type. bfloat16 is the upper half of a float32, so widening it
back is a shift; narrowing rounds to nearest even, done by torch (a float32 -> bfloat16 cast).
"""

from __future__ import annotations

import numpy as np
import torch

from recserve.config import RowDtype

STORAGE_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16),
}


def row_bytes(dtype: RowDtype, dim: int) -> int:
    return dim * STORAGE_DTYPE[dtype].itemsize


def to_storage(rows: np.ndarray, dtype: RowDtype) -> np.ndarray:
    """rows (any float dtype) as a contiguous array of the stored values or bits."""
    if dtype == "float32":
        return np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(rows, dtype=np.float16).view(np.uint16)
    wide = torch.from_numpy(np.array(rows, dtype=np.float32, order="C", copy=True))  # a copy torch may own
    return wide.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def to_float32(stored: np.ndarray, dtype: RowDtype) -> np.ndarray:
    """Stored values or bits (as `to_storage` gives them, or read back raw) as float32."""
    if dtype == "float32":
        return stored.view(np.float32)
    if dtype == "float16":
        return stored.view(np.float16).astype(np.float32)
    return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_bytes(raw: bytes, dtype: RowDtype, dim: int) -> np.ndarray:
    """Rows stored as raw bytes (RocksDB values, joined), as float32 [n, dim]."""
    return to_float32(np.frombuffer(raw, dtype=STORAGE_DTYPE[dtype]), dtype).reshape(-1, dim)
