"""Synthetic tables and key streams with power-law popularity, for the demo, benchmarks and tests."""

from __future__ import annotations

import numpy as np


class ZipfKeys:
    """Draws keys from `num_keys` ids with P(rank r) proportional to 1 / r**alpha.

    Popular ids are scattered over the key space (a seeded permutation), as real ids are, so that popularity
    does not line up with partitions or key order. Bounded, unlike numpy's `zipf`, and any alpha >= 0 works.
    """

    def __init__(self, num_keys: int, alpha: float = 1.05, seed: int = 0) -> None:
        if num_keys <= 0:
            raise ValueError(f"num_keys must be > 0, got {num_keys}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self._rng = np.random.default_rng(seed)
        weights = np.arange(1, num_keys + 1, dtype=np.float64) ** -alpha
        self._cdf = np.cumsum(weights)
        self._cdf /= self._cdf[-1]
        self._ids = self._rng.permutation(num_keys).astype(np.int64)

    def sample(self, size: int) -> np.ndarray:
        ranks = np.searchsorted(self._cdf, self._rng.random(size), side="right")
        return self._ids[np.minimum(ranks, self._ids.size - 1)]


def random_rows(num_rows: int, dim: int, seed: int = 0, chunk: int = 1 << 20) -> np.ndarray:
    """float32 [num_rows, dim] uniform in [-0.05, 0.05), made in chunks to bound temporary memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_rows, dim), dtype=np.float32)
    for start in range(0, num_rows, chunk):
        block = out[start : start + chunk]
        rng.random(block.shape, dtype=np.float32, out=block)
        block -= 0.5
        block *= 0.1
    return out
