"""The open-loop runner: latency from the scheduled time (no coordinated omission), refusals as misses, a real
executor as the target, and a dead server reported instead of hanging."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main
from recserve.config import ArrivalProcess, LoadConfig, SizeDistribution
from recserve.errors import OverloadedError
from recserve.loadgen.runner import run_load, summarize
from recserve.loadgen.targets import InProcessTarget
from recserve.loadgen.workload import Query, QueryPool
from recserve.models.specs import model_spec
from recserve.serve.repository import ServedModel, load_model, write_model_folder

SPEC = model_spec("ncf", "tiny")


class OneAtATime:
    """A stand-in server that answers queries one at a time, `service_s` each, refusing when `limit` wait."""

    def __init__(self, service_s: float, limit: int | None = None) -> None:
        self.service_s, self.limit, self.waiting = service_s, limit, 0
        self.answered, self.busy_s = 0, 0.0  # what it really did: a loaded machine oversleeps
        self._lock = asyncio.Lock()

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        if self.limit is not None and self.waiting >= self.limit:
            raise OverloadedError("queue full")
        self.waiting += 1
        try:
            async with self._lock:
                started = time.perf_counter()
                await asyncio.sleep(self.service_s)
                self.busy_s += time.perf_counter() - started
                self.answered += 1
        finally:
            self.waiting -= 1

    async def close(self) -> None:
        pass


def load(qps: float, duration_s: float, **fields: object) -> LoadConfig:
    return LoadConfig(model="ncf", duration_s=duration_s, arrivals=ArrivalProcess(kind="constant", qps=qps),
                      sizes=SizeDistribution(kind="fixed", items=4, max_items=8), **fields)


@pytest.fixture(scope="module")
def pool() -> QueryPool:
    return QueryPool(SPEC, max_items=8, bases=1)


def test_an_overloaded_server_shows_as_growing_latency(pool: QueryPool) -> None:
    """100 qps into a 40 qps server: a closed loop would report ~25 ms each; the open loop sees the queue grow."""
    config = load(100.0, 1.0)
    server = OneAtATime(0.025)
    samples = asyncio.run(run_load(server, pool, config, progress=False))
    summary = summarize(samples, config)
    assert summary.queries == 100 and summary.ok == 100
    latencies = np.array([s.latency_s for s in samples])
    assert latencies[-1] > 1.0  # the last query waited for the 99 before it: ~100 x 25 ms - 1 s
    assert np.all(np.diff(latencies) > 0)  # each waits longer than the one before
    # the server's own pace (40 qps were its sleeps exact; fewer on a busy machine), not the 100 offered
    capacity_qps = server.answered / server.busy_s
    assert capacity_qps <= 41
    assert summary.achieved_qps == pytest.approx(capacity_qps, rel=0.15) and summary.p99_ms > 900


def test_a_server_within_capacity_answers_at_its_service_time(pool: QueryPool) -> None:
    config = load(20.0, 1.0)
    summary = summarize(asyncio.run(run_load(OneAtATime(0.01), pool, config, progress=False)), config)
    assert summary.ok == 20 and 10 <= summary.p50_ms < 40 and summary.offered_qps == pytest.approx(20)


def test_refusals_count_as_misses_and_the_in_flight_cap_as_drops(pool: QueryPool) -> None:
    config = load(200.0, 0.5)
    samples = asyncio.run(run_load(OneAtATime(0.05, limit=2), pool, config, progress=False))
    summary = summarize(samples, config)
    assert summary.rejected > 50 and summary.ok + summary.rejected == 100
    assert math.isinf(summary.p95_ms)  # refused queries never meet a target
    capped = load(200.0, 0.5, max_in_flight=3)
    dropped = summarize(asyncio.run(run_load(OneAtATime(0.05), pool, capped, progress=False)), capped)
    assert dropped.dropped > 50 and dropped.ok + dropped.dropped == 100


@pytest.fixture(scope="module")
def ncf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    folder = tmp_path_factory.mktemp("repo") / "ncf"
    write_model_folder(folder, "ncf", seed=5, serving={"scheduler": {"batch_size": 4, "latency_target_ms": 60_000},
                                                       "dram": {"num_partitions": 2}})
    served = load_model(folder)
    yield served
    served.close()


def test_poisson_load_against_a_real_executor(ncf: ServedModel) -> None:
    config = LoadConfig(model="ncf", duration_s=1.0, arrivals=ArrivalProcess(qps=30.0),
                        sizes=SizeDistribution(kind="lognormal", mu=2.0, sigma=0.5, max_items=32))
    pool = QueryPool(ncf.signature.spec, max_items=32, seed=2, bases=2)
    samples = asyncio.run(run_load(InProcessTarget(ncf.executor), pool, config, progress=False))
    summary = summarize(samples, config)
    assert summary.ok == summary.queries > 10 and summary.errors == 0
    assert 0 < summary.p50_ms <= summary.p95_ms <= summary.p99_ms <= summary.max_ms < 60_000


def test_bench_against_a_dead_server_reports_and_exits_non_zero(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code = main(["bench", "--grpc", f"127.0.0.1:{port}", "--model", "ncf", "--qps", "20", "--duration", "0.5",
                 "--out", str(tmp_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "queries failed; the first:" in out and (tmp_path / "bench.json").exists()
