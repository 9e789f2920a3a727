"""Bags of keys for pooled lookups: checking their offsets, and pooling rows read outside the fused DRAM pass."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from recserve.errors import InvalidInputError
from recserve.ps.keys import is_flat_int64


def as_offsets(offsets: object, num_keys: int, table: str) -> np.ndarray:
    """Bag offsets as a contiguous int64 array: 0 first, num_keys last, never decreasing."""
    if is_flat_int64(offsets) and offsets.size:  # type: ignore[attr-defined]  # the usual case: no conversions
        array = offsets
    else:
        array = np.asarray(offsets.numpy() if isinstance(offsets, torch.Tensor) else offsets)
        if array.dtype.kind not in "iu" or array.ndim != 1 or array.size == 0:
            raise InvalidInputError(
                f"table '{table}': offsets must be a non-empty 1-D integer array, got {array.dtype} {array.shape}"
            )
        array = np.ascontiguousarray(array, dtype=np.int64)
    if not _runs_up_to(array, num_keys):  # one compiled pass: numpy's checks cost more than a small lookup
        if array[0] != 0 or array[-1] != num_keys:
            raise InvalidInputError(
                f"table '{table}': offsets must run from 0 to the {num_keys} keys, got {array[0]}..{array[-1]}"
            )
        raise InvalidInputError(f"table '{table}': offsets must not decrease (a bag has a negative length)")
    return array


@njit(nogil=True, cache=True)
def _runs_up_to(offsets, end):
    ok = offsets[0] == 0 and offsets[-1] == end
    for i in range(1, offsets.size):
        ok &= offsets[i] >= offsets[i - 1]
    return ok


def pool(rows: np.ndarray, row_of: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bag b's sum of rows[row_of[offsets[b]:offsets[b + 1]]], [len(offsets) - 1, dim] float32."""
    return F.embedding_bag(
        torch.from_numpy(row_of), torch.from_numpy(rows), torch.from_numpy(offsets), mode="sum",
        include_last_offset=True,
    ).numpy()


def add_to_bags(pooled: np.ndarray, offsets: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                row_of: np.ndarray) -> None:
    """pooled[bag holding key position positions[j]] += rows[row_of[j]]; positions increasing."""
    if positions.size:
        pooled += pool(rows, row_of, np.searchsorted(positions, offsets))  # where each bag's positions begin
