"""Latency histograms that components fill and front ends export (Prometheus buckets, percentiles)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import numpy as np

# 1 us .. ~100 s, four buckets per decade: fine enough for p50/p99 of lookups and requests alike
BUCKET_BOUNDS_S = tuple(float(b) for b in np.logspace(-6, 2, 33))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds_s: tuple[float, ...]  # upper bounds; the last bucket (index len(bounds_s)) is +Inf
    counts: tuple[int, ...]  # len(bounds_s) + 1
    count: int
    sum_s: float

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, n in zip((*self.bounds_s, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")


class LatencyHistogram:
    """Thread-safe fixed-bucket histogram of durations in seconds."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKET_BOUNDS_S) + 1)
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        bucket = bisect.bisect_left(BUCKET_BOUNDS_S, seconds)
        with self._lock:
            self._counts[bucket] += 1
            self._count += 1
            self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(BUCKET_BOUNDS_S, tuple(self._counts), self._count, self._sum)
