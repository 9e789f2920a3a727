"""Results for people: a text table, a JSON file, and PNG plots (matplotlib, drawn off-screen)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from recserve.loadgen.runner import RunSummary, Sample

COLUMNS = ("offered_qps", "achieved_qps", "items_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "ok", "rejected",
           "errors", "dropped")


def table(rows: Iterable[tuple[str, RunSummary]]) -> str:
    """One line per run: a label, then the summary's figures."""
    header = f"{'run':<28}" + "".join(f"{c:>13}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for label, summary in rows:
        values = summary.as_dict()
        lines.append(f"{label:<28}" + "".join(f"{_cell(values[c]):>13}" for c in COLUMNS))
    return "\n".join(lines)


def _cell(value: float | int) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:,.1f}"
    return f"{value:,}"


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "as_dict"):
        return value.as_dict()  # type: ignore[union-attr]
    return str(value)


def plot_latency_vs_load(path: Path, curves: dict[str, list[tuple[float, RunSummary]]], target_ms: float,
                         percentile: float) -> None:
    """Tail latency against offered QPS, one line per configuration, with the target drawn across."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        points = sorted((qps, s.tail_ms(percentile)) for qps, s in runs)
        finite = [(q, t) for q, t in points if math.isfinite(t)]
        if finite:
            axes.plot(*zip(*finite, strict=True), marker="o", label=label)
    axes.axhline(target_ms, color="grey", linestyle="--", label=f"p{percentile:g} target")
    axes.set_xlabel("offered load (queries/s)")
    axes.set_ylabel(f"p{percentile:g} latency (ms)")
    axes.set_yscale("log")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_latency_over_time(path: Path, samples: list[Sample], title: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    ok = [(s.scheduled_s, s.latency_s * 1e3) for s in samples if s.outcome == "ok"]
    refused = [s.scheduled_s for s in samples if s.outcome != "ok"]
    if ok:
        axes.scatter(*zip(*ok, strict=True), s=4, label="answered")
    if refused:
        axes.scatter(refused, [max((t for _, t in ok), default=1.0)] * len(refused), s=6, marker="x", color="red",
                     label="refused / failed")
    axes.set_xlabel("scheduled send time (s)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def _save(figure: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()  # type: ignore[attr-defined]
    figure.savefig(path, dpi=110)  # type: ignore[attr-defined]
    _pyplot().close(figure)
