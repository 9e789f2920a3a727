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
                 "--max-items", "64", "--target-ms", "200", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(baseline)" in out and "<- best" in out and "vs baseline" in out
    document = json.loads((tmp_path / "tune.json").read_text())
    assert document["tuned_qps"] >= document["baseline_qps"] > 0
    assert document["ratio"] == pytest.approx(document["tuned_qps"] / document["baseline_qps"])
    assert len(document["tried"]) >= 3 and all(t["probes"] for t in document["tried"])
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 10_000


def test_a_target_nothing_meets_is_reported_not_looped(repo: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--repo", str(repo), "--model", "ncf", "--qps", "4", "--duration", "0.3",
                 "--max-items", "16", "--target-ms", "0.001", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no setting meets p95 <= 0.001 ms at any load" in out
    assert json.loads((tmp_path / "tune.json").read_text())["tuned_qps"] == 0


def test_bad_load_parameters_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--repo", str(tmp_path), "--qps", "-3"]) == 2
    assert "qps" in capsys.readouterr().err
    assert main(["bench", "--repo", str(tmp_path), "--sizes", "file"]) == 2
    assert "needs a path" in capsys.readouterr().err
