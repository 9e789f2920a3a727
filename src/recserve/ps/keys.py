"""Validating and deduplicating the keys of a lookup."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from recserve.errors import InvalidInputError


def as_keys(keys: object, table: str) -> np.ndarray:
    """Keys as a contiguous 1-D int64 array.

    Any integer dtype converts (losslessly; unsigned values above 2**63 - 1 are refused). Floats, bools and
    anything else are refused: a float key is almost always a bug upstream (a dense feature in the sparse
    slot), and silently truncating it would return the wrong row.
    """
    if is_flat_int64(keys):  # the usual case, first: the general checks below cost ~5 us a call
        return keys
    if isinstance(keys, torch.Tensor):
        keys = keys.detach().cpu().numpy()
    elif isinstance(keys, list | tuple | range):
        keys = np.asarray(keys)
        if keys.size == 0:
            keys = keys.astype(np.int64)
    if not isinstance(keys, np.ndarray):
        raise InvalidInputError(f"table '{table}': keys must be an array of int64, got {type(keys).__name__}")
    if keys.dtype.kind not in "iu":
        raise InvalidInputError(f"table '{table}': keys must be integers (int64), got dtype {keys.dtype}")
    if keys.ndim != 1:
        raise InvalidInputError(f"table '{table}': keys must be 1-D, got shape {keys.shape}")
    if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
        raise InvalidInputError(f"table '{table}': key {int(keys.max())} does not fit in int64")
    return np.ascontiguousarray(keys, dtype=np.int64)


def is_flat_int64(array: object) -> bool:
    return type(array) is np.ndarray and array.dtype == np.int64 and array.ndim == 1 and array.flags.c_contiguous


@njit(nogil=True, cache=True)
def _unique_inverse(keys):
    # Hash-based, O(n) and order of first appearance; np.unique sorts (O(n log n)), which at 65k keys per
    # batch costs more than the lookup itself.
    n = keys.size
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    size = 1 << bits
    shift = np.uint64(64 - bits)
    table_keys = np.empty(size, dtype=np.int64)
    table_ids = np.full(size, -1, dtype=np.int64)
    unique = np.empty(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    count = 0
    for i in range(n):
        key = keys[i]
        s = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> shift)  # Fibonacci hashing
        while True:
            if table_ids[s] < 0:
                table_keys[s] = key
                table_ids[s] = count
                unique[count] = key
                inverse[i] = count
                count += 1
                break
            if table_keys[s] == key:
                inverse[i] = table_ids[s]
                break
            s = (s + 1) & (size - 1)
    return unique[:count], inverse


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys in order of first appearance, inverse) with unique[inverse] == keys."""
    return _unique_inverse(keys)
