"""`recserve bench` and `recserve tune`: a load against a running server (or a model loaded in this process),
reported as a table, a JSON file and plots."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from recserve.config import LoadConfig
from recserve.errors import InvalidInputError
from recserve.loadgen import report
from recserve.loadgen.runner import Target, summarize
from recserve.loadgen.targets import InProcessTarget, TritonTarget
from recserve.loadgen.tuning import PAPER_TARGETS_MS, HttpControl, measured_run, tune
from recserve.loadgen.workload import QueryPool
from recserve.models.specs import ModelSpec, model_spec
from recserve.sched.tuner import Setting, static_baseline


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the model is: a server (`grpc` or `http` address; `http` also controls the knobs) or a repository
    folder loaded in this process."""

    grpc: str | None = None
    http: str | None = None
    repo: Path | None = None
    preset: str = "tiny"
    num_tasks: int = 3
    shared_memory: bool = False  # inputs through /dev/shm regions (a server here, started with --allow-client-shm)


@dataclass
class Connected:
    spec: ModelSpec
    make_target: Callable[[], Target]
    apply: Callable[[Setting], None]
    accelerator: bool = False  # the model has an accelerator worker: T is worth tuning


@contextmanager
def connect(endpoint: Endpoint, model: str) -> Iterator[Connected]:
    if endpoint.repo is not None:
        from recserve.serve.repository import load_model

        served = load_model(endpoint.repo / model)
        try:
            yield Connected(served.signature.spec, lambda: InProcessTarget(served.executor),
                            served.executor.apply, served.executor.accelerator_available)
        finally:
            served.close()
        return
    if endpoint.grpc is None and endpoint.http is None:
        raise InvalidInputError("give a server (--grpc or --http address) or --repo to load the model here")
    spec = model_spec(model, endpoint.preset, endpoint.num_tasks)  # type: ignore[arg-type]
    protocol, address = ("grpc", endpoint.grpc) if endpoint.grpc else ("http", endpoint.http)

    def no_control(setting: Setting) -> None:
        raise InvalidInputError("tuning needs --http: the knobs are set through its scheduler endpoint")

    control = HttpControl(endpoint.http, model) if endpoint.http else None
    yield Connected(spec, lambda: TritonTarget(address, model, spec, protocol,  # type: ignore[arg-type]
                                                endpoint.shared_memory),
                    control.apply if control else no_control, control.accelerator_available() if control else False)


def bench(endpoint: Endpoint, load: LoadConfig, out: Path, progress: bool = True) -> dict:
    """One open-loop run; prints the table, writes bench.json and latency_over_time.png under `out`."""
    with connect(endpoint, load.model) as connected:
        pool = QueryPool(connected.spec, load.sizes.max_items, load.zipf_alpha, load.seed)
        samples = asyncio.run(measured_run(connected.make_target, pool, load, progress))
    summary = summarize(samples, load)
    label = f"{load.model} {load.arrivals.kind} {load.arrivals.qps:g} qps"
    print(report.table([(label, summary)]))
    errors = [s.error for s in samples if s.outcome == "error"]
    if errors:
        print(f"{len(errors)} queries failed; the first: {errors[0]}")
    document = {"load": load.model_dump(mode="json"), "summary": summary, "first_errors": errors[:5]}
    report.write_json(out / "bench.json", document)
    report.plot_latency_over_time(out / "latency_over_time.png", samples, label)
    print(f"wrote {out / 'bench.json'} and {out / 'latency_over_time.png'}")
    return document


def tune_job(endpoint: Endpoint, load: LoadConfig, out: Path, target_ms: float | None = None,
             percentile: float = 95.0, target_scale: float = 1.0, progress: bool = True,
             confirm_rounds: int = 0) -> dict:
    """Baseline, scan of B and hill climb (and, with `confirm_rounds`, both measured again in turn); prints every
    setting tried, writes tune.json and latency_vs_load.png."""
    target_ms = (target_ms or PAPER_TARGETS_MS.get(load.model, 100.0)) * target_scale
    with connect(endpoint, load.model) as connected:
        pool = QueryPool(connected.spec, load.sizes.max_items, load.zipf_alpha, load.seed)
        result, baseline, measurements = tune(connected.apply, connected.make_target, pool, load, target_ms,
                                              percentile, os.cpu_count(), progress=progress,
                                              accelerator=connected.accelerator, confirm_rounds=confirm_rounds)
        connected.apply(result.best)  # leave the server on the best setting found
    baseline_setting = static_baseline(load.sizes.max_items, os.cpu_count() or 1)
    print(f"p{percentile:g} target {target_ms:g} ms; capacity (queries/s) of every setting tried:")
    for setting, found in sorted(result.tried.items(), key=lambda pair: -pair[1].qps):
        mark = (" (baseline)" if setting == baseline_setting else "") + (" <- best" if setting == result.best else "")
        print(f"  {setting!s:<24} {found.qps:10.1f}{mark}")
    if not result.feasible:
        print(f"no setting meets p{percentile:g} <= {target_ms:g} ms at any load: raise the target "
              "(--target-scale) or the hardware")
    ratio = result.best_qps / baseline.qps if baseline.qps > 0 else None
    if ratio is not None:
        print(f"tuned {result.best} sustains {result.best_qps:.1f} qps vs baseline {baseline.qps:.1f}: "
              f"{ratio:.2f}x")
    confirmation = measurements.confirmation
    if confirmation is not None:
        runs = len(confirmation.tuned_qps)
        print(f"measured {runs} times each, in turn: tuned {_figures(confirmation.tuned_qps)}, baseline "
              f"{_figures(confirmation.baseline_qps)} qps; medians {confirmation.tuned_median:.1f} vs "
              f"{confirmation.baseline_median:.1f}"
              + (f": {confirmation.ratio:.2f}x" if confirmation.ratio is not None else ""))
    document = {
        "model": load.model, "target_ms": target_ms, "percentile": percentile,
        "best": vars_of(result.best), "tuned_qps": result.best_qps, "baseline_qps": baseline.qps, "ratio": ratio,
        "confirmed": None if confirmation is None else {
            "tuned_qps": list(confirmation.tuned_qps), "baseline_qps": list(confirmation.baseline_qps),
            "tuned_median": confirmation.tuned_median, "baseline_median": confirmation.baseline_median,
            "ratio": confirmation.ratio,
        },
        "tried": [{"setting": vars_of(s), "qps": c.qps, "probes": [vars_of(p) for p in c.probes]}
                  for s, c in result.tried.items()],
    }
    report.write_json(out / "tune.json", document)
    curves = {str(s): runs for s, runs in measurements.runs.items()}
    report.plot_latency_vs_load(out / "latency_vs_load.png", curves, target_ms, percentile)
    print(f"wrote {out / 'tune.json'} and {out / 'latency_vs_load.png'}")
    return document


def _figures(values: tuple[float, ...]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def vars_of(value: object) -> dict:
    return {name: getattr(value, name) for name in value.__slots__}  # type: ignore[attr-defined]

