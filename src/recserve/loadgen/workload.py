"""The load: when queries are sent (arrival processes), how big they are (size distributions), what they hold.

All seeded and pure: the same config gives the same schedule, so two configurations of the server are measured
under the same load. Keys follow Zipf popularity per table (`QueryGenerator`); the original harness drew
uniform ids, which hides every cache effect.

The `production` size mix (heavy-tailed, as candidate counts of a real ranking service are: most queries are a few
hundred items, a few are thousands): 70% lognormal(mu 5.0, sigma 0.5) (~150 items), 25% lognormal(6.0, 0.5)
(~400), 5% Pareto(alpha 1.2) from 500 items up; clipped to [1, max_items] like every distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recserve.config import ArrivalProcess, SizeDistribution
from recserve.errors import InvalidInputError, MalformedFileError
from recserve.models.specs import ModelSpec
from recserve.models.synthetic import QueryGenerator
from recserve.sparse import SparseBatch


def arrival_times(process: ArrivalProcess, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start, ascending, all < duration_s."""
    if process.kind == "trace":
        assert process.path is not None
        times = _read_numbers(process.path, float, "trace")
        if np.any(np.diff(times) < 0) or (times.size and times[0] < 0):
            raise MalformedFileError(f"{process.path}: send times must be >= 0 and ascending")
        return times[times < duration_s]
    if process.kind == "constant":
        return np.arange(0.0, duration_s, 1.0 / process.qps)
    expected = int(process.qps * duration_s)
    gaps = rng.exponential(1.0 / process.qps, size=expected + 10 * int(np.sqrt(expected)) + 16)
    times = np.cumsum(gaps) - gaps[0]  # the first query at time 0
    while times[-1] < duration_s:  # rare: the gaps drawn fell short
        more = times[-1] + np.cumsum(rng.exponential(1.0 / process.qps, size=expected + 16))
        times = np.concatenate([times, more])
    return times[times < duration_s]


def query_sizes(distribution: SizeDistribution, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` sizes in [1, max_items]."""
    d = distribution
    if d.kind == "fixed":
        raw = np.full(count, d.items, dtype=np.float64)
    elif d.kind == "normal":
        raw = rng.normal(d.mean, d.std, size=count)
    elif d.kind == "lognormal":
        raw = rng.lognormal(d.mu, d.sigma, size=count)
    elif d.kind == "production":
        raw = _production_mix(count, rng)
    else:
        assert d.path is not None
        sizes = _read_numbers(d.path, int, "sizes")
        if sizes.size == 0:
            raise MalformedFileError(f"{d.path}: no sizes")
        if np.any(sizes < 1):
            raise MalformedFileError(f"{d.path}: sizes must be >= 1, got {int(sizes.min())}")
        raw = np.resize(sizes, count).astype(np.float64)
    if not np.all(np.isfinite(raw)):
        raise InvalidInputError(f"size distribution {d.kind} produced non-finite sizes: check its parameters")
    return np.clip(np.rint(raw), 1, d.max_items).astype(np.int64)


def _production_mix(count: int, rng: np.random.Generator) -> np.ndarray:
    component = rng.choice(3, size=count, p=[0.70, 0.25, 0.05])
    sizes = np.where(component == 0, rng.lognormal(5.0, 0.5, count), rng.lognormal(6.0, 0.5, count))
    tail = 500.0 * (1.0 + rng.pareto(1.2, count))
    return np.where(component == 2, tail, sizes)


def _read_numbers(path: Path, kind: type, what: str) -> np.ndarray:
    values = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MalformedFileError(f"{path}: cannot read the {what} file: {error}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            values.append(kind(text))
        except ValueError:
            raise MalformedFileError(f"{path}:{number}: not a number: {line.strip()[:40]!r}") from None
    return np.asarray(values, dtype=np.float64 if kind is float else np.int64)


@dataclass(frozen=True, slots=True)
class Query:
    dense: np.ndarray | None  # [items, dense_features] float32; None for models without dense features
    sparse: SparseBatch


class QueryPool:
    """Queries of any size up to max_items, cut from a few pre-generated big ones (generating Zipf keys for
    every query would cost the load generator more CPU than the server spends on it).

    A few bases hold few distinct keys (RMC1 `full`: 93 k of a table's 4M rows in 8 bases of 512 items), so a
    cache bigger than that ends up holding every key ever asked for. With `stream_keys` > 0 each query's keys
    of a table are instead a window, at a random offset, of that many Zipf draws made up front: what a cache of
    a live stream sees, as long as the run reads a stream no more than about once (RMC1 `full`, 10% of a table
    cached, 5,120-key batches: 72% of unique keys hit with fresh draws, 74% from windows of 32M draws, 75% of
    16M, 86% of 4M). The windows come from the pool's own generator, not the run's: a run replays its seeded
    schedule of sizes, and would otherwise replay its keys too, into a cache that still holds them.
    """

    def __init__(self, spec: ModelSpec, max_items: int, alpha: float = 1.05, seed: int = 0, bases: int = 8,
                 stream_keys: int = 0) -> None:
        longest = max((max_items * t.keys_per_item for t in spec.tables), default=0)
        if stream_keys and stream_keys < longest:
            raise InvalidInputError(f"stream_keys {stream_keys} < the keys of a {max_items}-item query ({longest})")
        generator = QueryGenerator(spec, alpha=alpha, seed=seed)
        self.spec = spec
        self.max_items = max_items
        self._bases = [generator.query(max_items) for _ in range(bases)]
        self._streams: dict[str, np.ndarray] = {}
        self._stream_rng = np.random.default_rng(seed)
        by_rows: dict[int, np.ndarray] = {}  # tables of one size share one stream, each read at its own offsets
        for table in spec.tables if stream_keys else ():
            if table.rows not in by_rows:
                by_rows[table.rows] = generator.keys(table.name, stream_keys)
            self._streams[table.name] = by_rows[table.rows]

    def query(self, items: int, rng: np.random.Generator) -> Query:
        if not 1 <= items <= self.max_items:
            raise InvalidInputError(f"query size {items} outside [1, {self.max_items}]")
        base = self._bases[int(rng.integers(len(self._bases)))]
        start = int(rng.integers(self.max_items - items + 1))
        dense = base.dense[start : start + items]
        sparse = base.sparse.slice(start, start + items)
        if self._streams:
            sparse = self._from_streams(sparse)
        return Query(dense=dense.numpy() if self.spec.dense_features else None, sparse=sparse)

    def _from_streams(self, sparse: SparseBatch) -> SparseBatch:
        features = {}
        for table, stream in self._streams.items():
            lengths = sparse.lengths(table).numpy()
            count = int(lengths.sum())
            at = int(self._stream_rng.integers(stream.size - count + 1))
            features[table] = (stream[at : at + count], lengths)
        return SparseBatch.from_lengths(features, name=self.spec.name)


def as_v2_arrays(spec: ModelSpec, query: Query) -> dict[str, np.ndarray]:
    """The query as a served model's named inputs (the convention of serve/repository.py)."""
    from recserve.serve.repository import short_name

    arrays = {}
    for table in spec.tables:
        short = short_name(spec, table.name)
        arrays[f"{short}_keys"] = np.ascontiguousarray(query.sparse.keys[table.name].numpy())
        arrays[f"{short}_lengths"] = torch.diff(query.sparse.offsets[table.name]).numpy()
    if spec.dense_features and query.dense is not None:
        arrays["dense"] = np.ascontiguousarray(query.dense, dtype=np.float32)
    return arrays
