"""How a table's rows are stored: float32, float16 or bfloat16 (`TableConfig.dtype`); always handed out as float32.

The DRAM tier and RocksDB keep 16-bit rows as their raw bits (uint16): the numba kernels copy rows without
knowing their format, and numpy has no bfloat16 type. bfloat16 is the upper half of a float32, so widening it
back is a shift; narrowing rounds to nearest even, done by torch (a float32 -> bfloat16 cast).
"""

from __future__ import annotations

import numpy as np
import torch

from recserve.config import ROW_ITEMSIZE, RowDtype
from recserve.errors import InvalidInputError

STORAGE_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16),
}
_INFINITY_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}  # exponent all ones, mantissa zero (sign masked off)
_LARGEST = {"float32": float(np.finfo(np.float32).max), "float16": float(np.finfo(np.float16).max),
            "bfloat16": float(torch.finfo(torch.bfloat16).max)}


def row_bytes(dtype: RowDtype, dim: int) -> int:
    return dim * ROW_ITEMSIZE[dtype]


def to_storage(rows: np.ndarray, dtype: RowDtype, table: str, row_numbers: np.ndarray | None = None
               ) -> np.ndarray:
    """rows [n, dim] (any float dtype) as a contiguous array of the stored values or bits.

    A finite value that the dtype cannot hold is refused: a cast would store infinity, a row silently
    corrupted. The error names the row, as row_numbers[i] for rows[i] when given (rows picked out of a larger
    array)."""
    rows = np.asarray(rows)
    if dtype == "float32" and rows.dtype == np.float32:  # the common case: nothing to convert or check
        return np.ascontiguousarray(rows)
    with np.errstate(over="ignore"):  # checked below, and named
        if dtype == "float32":
            stored = np.ascontiguousarray(rows, dtype=np.float32)
            if rows.dtype.itemsize > 4:  # only a wider float can overflow float32
                _refuse_overflow(rows, np.isinf(stored), dtype, table, row_numbers)
            return stored
        if dtype == "float16":
            stored = np.ascontiguousarray(rows, dtype=np.float16).view(np.uint16)
        else:
            wide = torch.from_numpy(np.array(rows, dtype=np.float32, order="C", copy=True))  # torch may own it
            stored = wide.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    _refuse_overflow(rows, (stored & 0x7FFF) == _INFINITY_BITS[dtype], dtype, table, row_numbers)
    return stored


def _refuse_overflow(rows: np.ndarray, infinite: np.ndarray, dtype: RowDtype, table: str,
                     row_numbers: np.ndarray | None) -> None:
    if not infinite.any():  # the common case costs this one pass
        return
    overflowed = np.argwhere(infinite & np.isfinite(rows))
    if overflowed.size:
        row, column = (int(i) for i in overflowed[0])
        named = row if row_numbers is None else int(row_numbers[row])
        raise InvalidInputError(
            f"table '{table}': row {named}, column {column} holds {float(rows[row, column]):g}, beyond the range "
            f"of {dtype} (largest {_LARGEST[dtype]:g}); {len(overflowed)} value(s) in all"
        )


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
