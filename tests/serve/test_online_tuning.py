"""Online re-tuning in a real server: a load that drifts starts a re-tune on the live traffic, and no query
fails while the tuner moves the knobs under it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from recserve.config import ArrivalProcess, LoadConfig, SizeDistribution
from recserve.loadgen.runner import summarize
from recserve.loadgen.targets import TritonTarget
from recserve.loadgen.tuning import measured_run
from recserve.loadgen.workload import QueryPool
from recserve.models.checkpoint import checkpoint_spec
from recserve.serve.app import ServerProcess, spawn_server
from recserve.serve.repository import write_model_folder


@pytest.fixture(scope="module")
def tuned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    repo = tmp_path_factory.mktemp("online")
    write_model_folder(repo / "ncf", "ncf", "tiny", seed=3, serving={
        "scheduler": {"batch_size": 64, "num_workers": 1, "threads_per_worker": 1, "latency_target_ms": 60_000,
                      "max_queue": 4096},
        "online_tuning": {"enabled": True, "window_s": 1.0, "min_queries": 10},
        "dram": {"num_partitions": 2}, "max_items": 64,
    })
    log = tmp_path_factory.mktemp("online-log") / "stderr.log"
    with open(log, "w") as stderr:
        server = spawn_server(repo, stderr=stderr)
    try:
        yield server, repo
    finally:
        server.stop()


def scheduler(server: ServerProcess, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"http://{server.http}/v2/models/ncf/scheduler", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def offer(server: ServerProcess, pool: QueryPool, qps: float, seconds: float) -> None:
    load = LoadConfig(model="ncf", duration_s=seconds, arrivals=ArrivalProcess(kind="constant", qps=qps),
                      sizes=SizeDistribution(kind="fixed", items=32, max_items=64))
    samples = asyncio.run(measured_run(lambda: TritonTarget(server.grpc, "ncf", pool.spec), pool, load, False))
    summary = summarize(samples, load)
    assert summary.errors == 0 and summary.rejected == 0, summary


def test_a_load_drift_starts_a_retune_on_live_traffic(tuned_server: tuple[ServerProcess, Path]) -> None:
    server, repo = tuned_server
    pool = QueryPool(checkpoint_spec(repo / "ncf"), 64, seed=1)
    offer(server, pool, qps=15.0, seconds=3.5)  # the reference load
    state = scheduler(server)["online_tuning"]
    assert state["state"] == "steady" and 10 <= state["tuned_qps"] <= 20
    offer(server, pool, qps=45.0, seconds=6.0)  # tripled: re-tune, every query still answered
    deadline = time.monotonic() + 30
    while not (history := scheduler(server)["online_tuning"]["history"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    decisions = [entry["decision"] for entry in history]
    assert decisions[0].startswith("re-tuning (load "), decisions
    assert any("trying B=" in d for d in decisions), decisions


def test_a_hand_set_knob_restarts_the_online_tuner_from_it(tuned_server: tuple[ServerProcess, Path]) -> None:
    server, _ = tuned_server
    state = scheduler(server, {"batch_size": 16, "num_workers": 1, "threads_per_worker": 1})
    assert state["batch_size"] == 16
    assert state["online_tuning"]["state"] == "warming"
    assert state["online_tuning"]["current"] == "B=16 W=1 k=1"
