"""Measuring capacity and tuning a live model: the tuner's callbacks, made of load-generator runs.

    capacity(setting) = the highest Poisson QPS whose p95 (or p99) stays under the model's latency target,
    each probe a fresh open-loop run of the same seeded workload against the model with `setting` applied.

The static baseline DeepRecSys compares against: each query whole (B = the largest query), one worker with
every core's threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from recserve.config import LoadConfig
from recserve.errors import InvalidInputError, TierUnavailableError
from recserve.loadgen.runner import RunSummary, Target, run_load, summarize
from recserve.loadgen.workload import QueryPool
from recserve.sched.tuner import (
    Capacity,
    Confirmation,
    Setting,
    TuneResult,
    confirm,
    max_qps,
    static_baseline,
    tune_against_baseline,
)

# p95 latency targets of the DeepRecSys paper, ms; scale them per machine (--target-scale)
MIN_PROBE_QUERIES = 40
PAPER_TARGETS_MS = {"ncf": 5.0, "wnd": 25.0, "mtwnd": 25.0, "rmc1": 100.0, "rmc2": 400.0, "rmc3": 100.0,
                    "din": 100.0, "dien": 35.0}


@dataclass
class Measurements:
    """Every run made while tuning, for the report: setting -> [(offered qps, summary)]."""

    runs: dict[Setting, list[tuple[float, RunSummary]]] = field(default_factory=dict)
    confirmation: Confirmation | None = None  # with confirm_rounds: the baseline and the best measured again

    def add(self, setting: Setting, qps: float, summary: RunSummary) -> None:
        self.runs.setdefault(setting, []).append((qps, summary))


class HttpControl:
    """Applies settings through a running server's scheduler endpoint (blocking: new workers start first)."""

    def __init__(self, http_address: str, model: str) -> None:
        self.url = f"http://{http_address}/v2/models/{model}/scheduler"

    def accelerator_available(self) -> bool:
        return bool(self._call(urllib.request.Request(self.url), timeout_s=60).get("accelerator_available"))

    def apply(self, setting: Setting) -> None:
        body = json.dumps({"batch_size": setting.batch_size, "num_workers": setting.num_workers,
                           "threads_per_worker": setting.threads_per_worker,
                           "accelerator_threshold": setting.accelerator_threshold}).encode()
        self._call(urllib.request.Request(self.url, data=body, method="POST",
                                          headers={"Content-Type": "application/json"}), timeout_s=600)

    def _call(self, request: urllib.request.Request, timeout_s: float) -> dict:
        """The endpoint's JSON answer; a refusal names the server's reason, a dead server says so."""
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise InvalidInputError(f"{self.url}: {error.code} {error.read().decode(errors='replace')}") from None
        except OSError as error:
            raise TierUnavailableError("server", f"{self.url}: {error}") from None


async def measured_run(make_target: Callable[[], Target], pool: QueryPool, config: LoadConfig,
                       progress: bool = True) -> list:
    """One open-loop run with a fresh client (asyncio clients belong to the loop that made them)."""
    target = make_target()
    try:
        return await run_load(target, pool, config, progress=progress)
    finally:
        await target.close()


def warm_up(make_target: Callable[[], Target], pool: QueryPool, load: LoadConfig) -> None:
    """A short unmeasured load after a setting changes: new workers' first queries of each size are slow."""
    config = load.model_copy(update={"duration_s": 1.0, "arrivals": load.arrivals.model_copy(
        update={"kind": "constant", "qps": 20.0})})
    asyncio.run(measured_run(make_target, pool, config, progress=False))


def capacity(make_target: Callable[[], Target], pool: QueryPool, load: LoadConfig, target_ms: float,
             percentile: float, start_qps: float, on_run: Callable[[float, RunSummary], None] | None = None,
             progress: bool = True) -> Capacity:
    """The highest offered QPS meeting the target, by the tuner's bracket-and-bisect over open-loop runs."""

    def measure(qps: float) -> float:
        # a p95 needs enough queries behind it: a low-load probe runs longer (up to 4x the set duration)
        duration = max(load.duration_s, min(MIN_PROBE_QUERIES / qps, 4 * load.duration_s))
        config = load.model_copy(update={"duration_s": duration,
                                         "arrivals": load.arrivals.model_copy(update={"qps": qps})})
        samples = asyncio.run(measured_run(make_target, pool, config, progress))
        summary = summarize(samples, config)
        if summary.errors:
            first = next(s.error for s in samples if s.outcome == "error")
            raise TierUnavailableError("server", f"{summary.errors} queries failed at {qps:.1f} qps: {first}")
        if on_run:
            on_run(qps, summary)
        return summary.tail_ms(percentile)

    return max_qps(measure, target_ms, start_qps)


def tune(apply: Callable[[Setting], None], make_target: Callable[[], Target], pool: QueryPool, load: LoadConfig,
         target_ms: float, percentile: float = 95.0, cores: int | None = None,
         progress: bool = True, accelerator: bool = False, confirm_rounds: int = 0,
         ) -> tuple[TuneResult, Capacity, Measurements]:
    """The baseline's capacity, then the scan of B's and the hill climb's; every run recorded. With
    `confirm_rounds`, the baseline and the best are then measured that many more times each, in turn
    (`sched.tuner.confirm`)."""
    if confirm_rounds < 0:
        raise InvalidInputError(f"confirm rounds must be >= 0, got {confirm_rounds}")
    measurements = Measurements()
    # Each search starts at the best capacity found so far: the rates that decide whether a setting wins. (It
    # started at the last one found, and after a bad setting the next search began at 1 qps, where a probe holds
    # a handful of queries and one slow query failed it: a 113-qps setting came out at 1.4.)
    best = [5.0]

    def evaluate(setting: Setting) -> Capacity:
        apply(setting)
        warm_up(make_target, pool, load)
        found = capacity(make_target, pool, load, target_ms, percentile, best[0],
                         lambda qps, summary: measurements.add(setting, qps, summary), progress)
        best[0] = max(best[0], found.qps)
        return found

    cores = cores or os.cpu_count() or 1
    result, baseline = tune_against_baseline(evaluate, load.sizes.max_items, cores, accelerator=accelerator)
    baseline_setting = static_baseline(load.sizes.max_items, cores)
    if confirm_rounds and result.best != baseline_setting:
        measurements.confirmation = confirm(evaluate, baseline_setting, baseline.qps, result.best, result.best_qps,
                                            confirm_rounds)
    return result, baseline, measurements
