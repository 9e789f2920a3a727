"""The open-loop load generator: send each query at its scheduled time, whatever the server is doing.

Latency counts from the scheduled send time, not from when the query actually went out, so a server (or a load
generator) that falls behind shows up as latency instead of silently lowering the load: the original harness
blocked on a full queue, which hides exactly the overload a tail-latency study is about (coordinated omission).
Refused queries (503 / RESOURCE_EXHAUSTED) count as misses of any latency target, so admission control cannot make a
tail look good by refusing the slow part of it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import numpy as np
from tqdm import tqdm

from recserve.config import LoadConfig
from recserve.errors import OverloadedError
from recserve.loadgen.workload import Query, QueryPool, arrival_times, query_sizes

Outcome = Literal["ok", "rejected", "error", "dropped"]


@dataclass(frozen=True, slots=True)
class Sample:
    scheduled_s: float  # send time from the start of the run
    items: int
    latency_s: float  # scheduled send -> answer; inf unless ok
    outcome: Outcome
    error: str = ""


@dataclass(frozen=True, slots=True)
class RunSummary:
    offered_qps: float
    achieved_qps: float  # answered queries per second of the run
    items_per_s: float
    queries: int
    ok: int
    rejected: int
    errors: int
    dropped: int  # the load generator itself could not keep up (max_in_flight): the run is not valid
    p50_ms: float  # over every query, refused ones counted as infinitely late
    p95_ms: float
    p99_ms: float
    max_ms: float
    duration_s: float

    def tail_ms(self, percentile: float) -> float:
        return {50.0: self.p50_ms, 95.0: self.p95_ms, 99.0: self.p99_ms}[percentile]

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


class Target(Protocol):
    """Where queries go: a running server (gRPC, HTTP) or an executor in this process."""

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        """Answer the query; raise OverloadedError when the server refused it, anything else on failure."""
        ...

    async def close(self) -> None:
        ...


def schedule(config: LoadConfig) -> tuple[np.ndarray, np.ndarray]:
    """(send times, sizes) of a run: seeded, so every configuration of the server gets the same load."""
    rng = np.random.default_rng(config.seed)
    times = arrival_times(config.arrivals, config.duration_s, rng)
    return times, query_sizes(config.sizes, times.size, rng)


async def run_load(target: Target, pool: QueryPool, config: LoadConfig, *, timeout_s: float | None = None,
                   progress: bool = True) -> list[Sample]:
    """Send the scheduled queries (open loop) and wait for every answer."""
    times, sizes = schedule(config)
    rng = np.random.default_rng(config.seed + 1)
    queries = [pool.query(int(n), rng) for n in sizes]  # cut before the clock starts: sending must be cheap
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    samples: list[Sample] = []
    in_flight: set[asyncio.Task] = set()

    async def one(scheduled: float, query: Query) -> None:
        items = query.sparse.num_items
        try:
            await target.infer(query, timeout_s)
        except OverloadedError:
            samples.append(Sample(scheduled, items, math.inf, "rejected"))
        except Exception as error:
            samples.append(Sample(scheduled, items, math.inf, "error", f"{type(error).__name__}: {error}"[:200]))
        else:
            samples.append(Sample(scheduled, items, loop.time() - start - scheduled, "ok"))

    bar = tqdm(total=len(queries), unit="q", desc=f"{config.model} {config.arrivals.qps:.0f} qps",
               disable=not progress, leave=False)
    for scheduled, query in zip(times, queries, strict=True):
        delay = start + scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        bar.update()
        if len(in_flight) >= config.max_in_flight:
            samples.append(Sample(float(scheduled), query.sparse.num_items, math.inf, "dropped"))
            continue
        task = asyncio.create_task(one(float(scheduled), query))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(list(in_flight))
    bar.close()
    return sorted(samples, key=lambda s: s.scheduled_s)


def summarize(samples: list[Sample], config: LoadConfig) -> RunSummary:
    if not samples:
        nan = math.nan
        return RunSummary(0.0, 0.0, 0.0, 0, 0, 0, 0, 0, nan, nan, nan, nan, config.duration_s)
    latencies = np.array([s.latency_s for s in samples]) * 1e3
    ok = [s for s in samples if s.outcome == "ok"]
    finished = max((s.scheduled_s + s.latency_s for s in ok), default=config.duration_s)
    duration = max(config.duration_s, finished)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99], method="higher")  # inf stays inf
    counts = {kind: sum(1 for s in samples if s.outcome == kind) for kind in ("rejected", "error", "dropped")}
    return RunSummary(
        offered_qps=len(samples) / config.duration_s, achieved_qps=len(ok) / duration,
        items_per_s=sum(s.items for s in ok) / duration, queries=len(samples), ok=len(ok),
        rejected=counts["rejected"], errors=counts["error"], dropped=counts["dropped"],
        p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99), max_ms=float(latencies.max()), duration_s=duration,
    )
