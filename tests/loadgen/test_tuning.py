"""`recserve tune` end to end on a model loaded in this process: a real search, and an impossible target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.cli import main
from recserve.serve.repository import write_model_folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model_folder(root / "ncf", "ncf", seed=1, serving={
        "scheduler": {"latency_target_ms": 60_000, "max_queue": 100_000}, "dram": {"num_partitions": 2}})
    return root


def test_tune_reports_every_setting_and_the_ratio(repo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--repo", str(repo), "--model", "ncf", "--qps", "50", "--duration", "0.4",
                 "--max-items", "64", "--target-ms", "200", "--out", str(tmp_path), "--confirm", "1"]) == 0
    out = capsys.readouterr().out
    assert "(baseline)" in out and "<- best" in out and "vs baseline" in out
    document = json.loads((tmp_path / "tune.json").read_text())
    assert document["tuned_qps"] >= document["baseline_qps"] > 0
    assert document["ratio"] == pytest.approx(document["tuned_qps"] / document["baseline_qps"])
    confirmed = document["confirmed"]  # measured again unless the baseline itself won
    if document["best"] != {"batch_size": 64, "num_workers": 1, "threads_per_worker": 2,
                            "accelerator_threshold": None}:
        assert "measured 2 times each, in turn" in out
        assert confirmed["tuned_qps"][0] == document["tuned_qps"] and len(confirmed["baseline_qps"]) == 2
        assert confirmed["ratio"] == pytest.approx(confirmed["tuned_median"] / confirmed["baseline_median"])
    else:
        assert confirmed is None
    assert len(document["tried"]) >= 3 and all(t["probes"] for t in document["tried"])
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 10_000


def test_a_target_nothing_meets_is_reported_not_looped(repo: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--repo", str(repo), "--model", "ncf", "--qps", "4", "--duration", "0.3",
                 "--max-items", "16", "--target-ms", "0.001", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no setting meets p95 <= 0.001 ms at any load" in out
    assert json.loads((tmp_path / "tune.json").read_text())["tuned_qps"] == 0


def test_a_negative_confirm_count_is_refused(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--repo", str(repo), "--model", "ncf", "--confirm", "-1", "--out", str(tmp_path)]) == 2
    assert "confirm rounds must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "tune.json").exists()


def test_bad_load_parameters_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--repo", str(tmp_path), "--qps", "-3"]) == 2
    assert "qps" in capsys.readouterr().err
    assert main(["bench", "--repo", str(tmp_path), "--sizes", "file"]) == 2
    assert "needs a path" in capsys.readouterr().err


def test_each_capacity_search_starts_at_the_best_capacity_found_so_far(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the last one: after a bad setting, a search that starts at 1 qps rests on probes of a handful of
    queries, and one slow query there decides the next setting's capacity."""
    from recserve.config import LoadConfig, SizeDistribution
    from recserve.loadgen import tuning
    from recserve.sched.tuner import Capacity, Setting

    def true_qps(s: Setting) -> float:  # single-threaded workers on mid-sized sub-batches win; W=1 k=2 is poor
        return 2.0 if s.num_workers == 1 and s.batch_size < 512 else {64: 70.0, 128: 90.0}.get(s.batch_size, 50.0)

    applied: list[Setting] = []
    starts: list[tuple[float, float]] = []  # (start of the search, best capacity found before it)
    found: list[float] = []

    def fake_capacity(*args: object, **kwargs: object) -> Capacity:
        starts.append((args[5], max(found, default=5.0)))  # type: ignore[arg-type]
        found.append(true_qps(applied[-1]))
        return Capacity(found[-1], ())

    monkeypatch.setattr(tuning, "capacity", fake_capacity)
    monkeypatch.setattr(tuning, "warm_up", lambda *args: None)
    load = LoadConfig(model="x", sizes=SizeDistribution(kind="fixed", items=512, max_items=512))
    result, baseline, measurements = tuning.tune(applied.append, lambda: None, None, load, 100.0,  # type: ignore[arg-type]
                                                 cores=2, progress=False, confirm_rounds=2)
    assert result.best == Setting(128, 2, 1) and baseline.qps == 50.0
    assert Setting(128, 1, 2) in applied  # a poor setting was measured, and the searches after it still start high
    assert all(start == best for start, best in starts) and len(starts) == len(applied)
    # then the best and the baseline again, in turn
    assert applied[-4:] == [Setting(128, 2, 1), Setting(512, 1, 2), Setting(512, 1, 2), Setting(128, 2, 1)]
    assert measurements.confirmation is not None
    assert measurements.confirmation.tuned_qps == (90.0,) * 3 and measurements.confirmation.baseline_qps == (50.0,) * 3
