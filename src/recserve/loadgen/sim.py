"""DeepRecInfra's simulator: the scheduler on machines we cannot run on.

1. Profile (on this machine): a sub-batch's service time as a function of its items b and the worker's
   threads k, as the real executor's workers report it, and the overhead every query pays besides.
2. Simulate (discrete events): the same arrival and size processes, each query split into sub-batches of B,
   W workers of k threads taking sub-batches earliest-deadline-first (ties in arrival order), and optionally an
   accelerator that takes queries of >= T items whole, with its own latency curve.

The simulated machine may have any number of cores; a worker's service time is looked up at its k (piecewise
linear in b, extrapolated linearly past the largest b profiled; beyond the thread counts profiled, by
Amdahl's law fitted to the two largest). What a 2-core profile cannot know (the
memory bandwidth of 64 cores) is not modelled: the simulator answers "what would the scheduler choose", not
"how fast is that machine".
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from recserve.config import LoadConfig
from recserve.errors import InvalidInputError
from recserve.loadgen.runner import RunSummary, Sample, run_load, schedule, summarize
from recserve.loadgen.targets import RecordingTarget
from recserve.loadgen.workload import QueryPool
from recserve.sched.executor import Executor, QueryResult
from recserve.sched.policy import item_ranges
from recserve.sched.tuner import Capacity, Setting, TuneResult, max_qps, tune_against_baseline


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Service time (seconds) of one sub-batch of b items on a worker with k threads: how long it keeps the
    worker busy. `overhead_s` is what every query spends besides (hand-offs to and from the worker, the client):
    latency that does not occupy a worker, so it adds to each query's time but not to the queue."""

    batch_sizes: tuple[int, ...]  # ascending
    seconds: dict[int, tuple[float, ...]]  # threads -> median service time per batch size
    overhead_s: float = 0.0
    # measured service times over their point's median, pooled: with them the simulator draws each sub-batch's
    # time as median x one of these (seeded), so that the tail it predicts carries the machine's variability
    spread: tuple[float, ...] = (1.0,)
    # a worker that was idle pays up to wake_s more on its next sub-batch (a process woken from sleep, its caches
    # cold), in proportion to how long it idled, in full after idle_s: measured as the difference between
    # queries sent back to back and queries sent idle_s apart
    wake_s: float = 0.0
    idle_s: float = 0.05
    # every query's overhead as measured (observed_profile): each simulated query draws one, instead of all
    # paying the median, so that the overhead's own tail reaches the simulated tail
    overheads: tuple[float, ...] = ()

    def service_s(self, items: int, threads: int) -> float:
        known = sorted(self.seconds)
        if threads in self.seconds:
            return self._at(self.seconds[threads], items)
        if threads > known[-1] and len(known) >= 2:  # Amdahl's law, fitted to the two largest thread counts
            k1, k2 = known[-2], known[-1]
            t1, t2 = self._at(self.seconds[k1], items), self._at(self.seconds[k2], items)
            # t(k) = serial + parallel / k through both points; a slower t2 means no parallel part
            parallel = max(0.0, (t1 - t2) / (1 / k1 - 1 / k2))
            serial = max(t2 - parallel / k2, 0.0)
            return serial + parallel / threads
        nearest = max((k for k in known if k <= threads), default=known[0])
        return self._at(self.seconds[nearest], items)

    def _at(self, curve: tuple[float, ...], items: int) -> float:
        sizes = self.batch_sizes
        if items <= sizes[0]:
            return curve[0]
        if items >= sizes[-1]:  # linear past the last point, with the slope of the last segment
            if len(sizes) == 1:
                return curve[-1] * items / sizes[-1]
            slope = (curve[-1] - curve[-2]) / (sizes[-1] - sizes[-2])
            return curve[-1] + max(slope, 0.0) * (items - sizes[-1])
        return float(np.interp(items, sizes, curve))  # piecewise linear: fixed cost + per-item cost

    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "seconds": {str(k): list(v) for k, v in self.seconds.items()},
                "overhead_s": self.overhead_s, "wake_s": self.wake_s,
                "spread_p5_p50_p95": [float(np.percentile(self.spread, q)) for q in (5, 50, 95)]}


def profile(measure: Callable[[int, int], list[tuple[float, float]]], batch_sizes: list[int],
            threads: list[int]) -> LatencyProfile:
    """A profile from `measure(b, k)` -> [(held, overhead) seconds of each query tried at that point]: the
    median time a sub-batch of b items holds a worker of k threads, and the median overhead over all points."""
    if not batch_sizes or not threads:
        raise InvalidInputError("profile needs batch sizes and thread counts")
    seconds: dict[int, list[float]] = {}
    overheads: list[float] = []
    spread: list[float] = []
    for k in threads:
        for b in sorted(batch_sizes):
            points = measure(b, k)
            held = [h for h, _ in points]
            median = float(np.median(held))
            seconds.setdefault(k, []).append(median)
            overheads.extend(overhead for _, overhead in points)
            spread.extend(h / median for h in held if median > 0)
    return LatencyProfile(tuple(sorted(batch_sizes)), {k: tuple(v) for k, v in seconds.items()},
                          overhead_s=float(np.median(overheads)), spread=tuple(sorted(spread)) or (1.0,))


@dataclass(frozen=True, slots=True)
class Accelerator:
    """An accelerator's latency for a whole query of n items: fixed + per_item x n (a transfer-dominated
    curve). Which queries go to it is the setting's T."""

    fixed_s: float
    per_item_s: float

    def service_s(self, items: int) -> float:
        return self.fixed_s + self.per_item_s * items


@dataclass(frozen=True, slots=True)
class ServiceTrace:
    """A measured run's own timings, query by query in schedule order: how long each sub-batch held its worker,
    and what the query spent besides (`observed_trace`). Given one, `simulate` replays these times instead of
    drawing them from a profile, so that the simulation differs from the run in one thing only, its model of
    queueing; a stall of the machine then lands on the same sub-batches in both."""

    held_s: tuple[tuple[float, ...] | None, ...]  # None: the query was not answered in the run
    overhead_s: tuple[float, ...]


@dataclass(order=True)
class _Task:
    deadline: float
    arrival: float
    query: int
    part: int = field(compare=True)
    items: int = field(compare=False)


def simulate(profile_: LatencyProfile, setting: Setting, load: LoadConfig, target_s: float,
             accelerator: Accelerator | None = None, trace: ServiceTrace | None = None) -> list[Sample]:
    """Per-query samples of the load on W workers (EDF over sub-batches) and the optional accelerator; with a
    trace, each answered query's sub-batches take the times it recorded."""
    times, sizes = schedule(load)
    rng = np.random.default_rng(load.seed)
    spread = np.asarray(profile_.spread)
    threshold = setting.accelerator_threshold if accelerator is not None else None
    worker_free = [0.0] * setting.num_workers  # when each worker is next idle
    accelerator_free = 0.0
    finish: dict[int, float] = {}
    ready: list[_Task] = []
    events = [(float(t), "arrive", q) for q, t in enumerate(times)]
    heapq.heapify(events)
    while events or ready:
        # the next thing to happen: an arrival, or a worker free to take the most urgent ready sub-batch
        next_free = min(worker_free)
        if events and (not ready or events[0][0] <= next_free):
            now, _, q = heapq.heappop(events)
            items = int(sizes[q])
            if threshold is not None and items >= threshold:
                start = max(now, accelerator_free)
                accelerator_free = start + accelerator.service_s(items)
                finish[q] = accelerator_free
                continue
            for part in range(math.ceil(items / setting.batch_size)):
                size = min(setting.batch_size, items - part * setting.batch_size)
                heapq.heappush(ready, _Task(now + target_s, now, q, part, size))
            continue
        task = heapq.heappop(ready)
        worker = worker_free.index(next_free)
        start = max(next_free, task.arrival)
        recorded = trace.held_s[task.query] if trace is not None else None
        if recorded is not None:
            worker_free[worker] = start + recorded[task.part]
        else:
            wake = profile_.wake_s * min(1.0, (start - next_free) / profile_.idle_s)
            jitter = float(spread[rng.integers(spread.size)]) if spread.size > 1 else 1.0
            worker_free[worker] = start + wake + profile_.service_s(task.items, setting.threads_per_worker) * jitter
        finish[task.query] = max(finish.get(task.query, 0.0), worker_free[worker])
    if trace is not None:
        overheads = np.asarray(trace.overhead_s)
    elif profile_.overheads:
        overheads = np.asarray(profile_.overheads)[rng.integers(len(profile_.overheads), size=len(times))]
    else:
        overheads = np.full(len(times), profile_.overhead_s)
    return [Sample(float(times[q]), int(sizes[q]), finish[q] - float(times[q]) + float(overheads[q]), "ok")
            for q in range(len(times))]


def simulated_summary(profile_: LatencyProfile, setting: Setting, load: LoadConfig, target_s: float,
                      accelerator: Accelerator | None = None, trace: ServiceTrace | None = None) -> RunSummary:
    return summarize(simulate(profile_, setting, load, target_s, accelerator, trace), load)


def executor_profile(executor: Executor, pool: QueryPool, batch_sizes: list[int], threads: list[int],
                     queries: int = 12, idle_gap_s: float = 0.05, seed: int = 0, workers: int = 1
                     ) -> LatencyProfile:
    """Profile a model through its executor: for each (b, k), queries sent one at a time from an event loop, as
    the load generator sends them. A worker's service time is how long a sub-batch holds it (dispatch to answer
    received); the overhead is the median of the rest of each query's latency.

    Service times come from queries sent back to back (a busy server's workers are awake); the same queries
    `idle_gap_s` apart give the wake-up cost of an idle worker. `workers` W > 1 profiles under contention: each
    query is W sub-batches of b items at once on W workers (on 2 cores, one busy worker is faster than two)."""
    rng = np.random.default_rng(seed)

    async def queries_at(items: int, gap_s: float) -> list[tuple[float, float]]:
        points = []
        for _ in range(queries):
            query = pool.query(items * workers, rng)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            result = await asyncio.wrap_future(executor.submit(query.dense, query.sparse))
            # the workers are held from dispatch until the answers are back (compute and both hand-offs); the
            # rest of the latency (reaching the executor, the event loop's wake-up) holds no worker
            held = result.total_s - result.queue_s
            points.append((held, loop.time() - sent - held))
            await asyncio.sleep(gap_s)
        return points[2:]  # the first after a knob change may meet a cold worker

    def measurer(gap_s: float) -> Callable[[int, int], list[tuple[float, float]]]:
        def measure(items: int, threads: int) -> list[tuple[float, float]]:
            executor.apply(Setting(items, workers, threads))
            return asyncio.run(queries_at(items, gap_s))

        return measure

    awake = profile(measurer(0.0), batch_sizes, threads)
    idle = profile(measurer(idle_gap_s), batch_sizes, threads)
    wake = [cold - warm for k in threads for cold, warm in zip(idle.seconds[k], awake.seconds[k], strict=True)]
    return dataclasses.replace(awake, wake_s=max(0.0, float(np.median(wake))), idle_s=idle_gap_s)


def observed_profile(samples: list[Sample], answers: list[tuple[float, QueryResult]], batch_size: int,
                     threads: int, bins: int = 6) -> LatencyProfile:
    """A profile from a measured run itself: every sub-batch's size and the time it held its worker, as medians
    over `bins` size ranges, with each time's ratio to its median as the spread; the overhead is the median of
    each query's measured latency less the executor's total (answers matched to samples in order of completion).

    What it leaves to the simulator is the queueing: arrivals, sub-batching, EDF over W workers. On a shared
    machine whose speed drifts by 2x from one minute to the next, a profile taken minutes before a run measures
    another machine; one taken from the run is the way to test the model of queueing, not the weather."""
    matched = _matched(samples, answers)
    sizes, held = [], []
    for _, result in matched.values():
        for (start, stop), seconds in zip(item_ranges(result.scores.shape[0], batch_size), result.held_s,
                                          strict=True):
            sizes.append(stop - start)
            held.append(seconds)
    size_arr, held_arr = np.asarray(sizes), np.asarray(held)
    edges = np.unique(np.quantile(size_arr, np.linspace(0, 1, bins + 1)).round().astype(int))
    points: dict[int, float] = {}
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else size_arr.max() + 1
        in_bin = (size_arr >= low) & (size_arr < high)
        if in_bin.any():
            points[int(np.median(size_arr[in_bin]))] = float(np.median(held_arr[in_bin]))
    batch_sizes = tuple(sorted(points))
    curve = LatencyProfile(batch_sizes, {threads: tuple(points[b] for b in batch_sizes)})
    spread = sorted(float(h / curve.service_s(int(b), threads)) for b, h in zip(size_arr, held_arr, strict=True))
    overheads = tuple(_overhead_s(sample, result) for sample, result in matched.values())
    return dataclasses.replace(curve, overhead_s=float(np.median(overheads)), spread=tuple(spread),
                               overheads=overheads)


def observed_trace(samples: list[Sample], answers: list[tuple[float, QueryResult]]) -> ServiceTrace:
    """The run's timings per query in schedule order (`samples` as `run_load` returns them)."""
    matched = _matched(samples, answers)
    pairs = [matched.get(i) for i in range(len(samples))]
    return ServiceTrace(held_s=tuple(None if pair is None else pair[1].held_s for pair in pairs),
                        overhead_s=tuple(0.0 if pair is None else _overhead_s(*pair) for pair in pairs))


def _overhead_s(sample: Sample, result: QueryResult) -> float:
    """What a query spent outside the executor: reaching it, and its answer coming back."""
    return max(0.0, sample.latency_s - result.total_s)


def _matched(samples: list[Sample], answers: list[tuple[float, QueryResult]]
             ) -> dict[int, tuple[Sample, QueryResult]]:
    """Each answered sample (by its index) with its executor result: both ordered by when the answer came."""
    ok = sorted((i for i, s in enumerate(samples) if s.outcome == "ok"),
                key=lambda i: samples[i].scheduled_s + samples[i].latency_s)
    answers = sorted(answers, key=lambda answer: answer[0])
    if not answers or len(ok) != len(answers):
        raise InvalidInputError(f"{len(answers)} answers for {len(ok)} answered queries: nothing to profile")
    return {i: (samples[i], result) for i, (_, result) in zip(ok, answers, strict=True)}


@dataclass(frozen=True, slots=True)
class Validation:
    measured: RunSummary
    replayed: RunSummary  # the same schedule simulated with the run's own times (`ServiceTrace`)
    modelled: RunSummary  # ... with times drawn from the run's observed profile, as a simulated machine's are
    trace: ServiceTrace
    observed: LatencyProfile


def validate(executor: Executor, pool: QueryPool, setting: Setting, load: LoadConfig) -> Validation:
    """Run a load in this process, then simulate the same schedule twice: replaying the run's timings, and
    drawing them from the profile observed in the run."""
    executor.apply(setting)
    target = RecordingTarget(executor)
    samples = asyncio.run(run_load(target, pool, load, progress=False))
    observed = observed_profile(samples, target.answers, setting.batch_size, setting.threads_per_worker)
    trace = observed_trace(samples, target.answers)
    target_s = executor.latency_target_s
    return Validation(
        measured=summarize(samples, load),
        replayed=simulated_summary(observed, setting, load, target_s, trace=trace),
        modelled=simulated_summary(observed, setting, load, target_s), trace=trace, observed=observed,
    )


def simulated_tune(profile_: LatencyProfile, load: LoadConfig, target_ms: float, cores: int,
                   percentile: float = 95.0, accelerator: Accelerator | None = None
                   ) -> tuple[TuneResult, Capacity]:
    """The tuner on a simulated machine of `cores` cores: (hill-climb result, static baseline's capacity)."""

    def evaluate(setting: Setting) -> Capacity:
        def measure(qps: float) -> float:
            config = load.model_copy(update={"arrivals": load.arrivals.model_copy(update={"qps": qps})})
            return simulated_summary(profile_, setting, config, target_ms / 1e3, accelerator).tail_ms(percentile)

        return max_qps(measure, target_ms, start_qps=10.0, max_probes=24, rel_tol=0.05)

    return tune_against_baseline(evaluate, load.sizes.max_items, cores, max_steps=16,
                                 accelerator=accelerator is not None)
