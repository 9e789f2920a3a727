"""The engine in this process: the path of a front end on an event loop (HTTP's) to the inline replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recserve.models.synthetic import QueryGenerator
from recserve.serve.codec import InferRequest
from recserve.serve.engine import InferenceServer
from recserve.serve.repository import write_model_folder
from tests.conftest import v2_inputs
from tests.sched.test_executor import parked_worker, scores_in_process

SERVING = {"scheduler": {"batch_size": 8, "num_workers": 1, "latency_target_ms": 60_000, "max_queue": 64,
                         "inline_max_items": 4},
           "dram": {"num_partitions": 2}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    repo = tmp_path_factory.mktemp("repo")
    write_model_folder(repo / "rmc1", "rmc1", seed=3, serving=SERVING)
    server = InferenceServer(repo)
    server.load()
    yield server
    server.close()


def infer(engine: InferenceServer, items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(served scores, in-process scores) of a query of `items` items through the event-loop path."""
    model = engine.model("rmc1")
    query = QueryGenerator(model.signature.spec, seed=seed).query(items)
    request = InferRequest(id="", inputs=v2_inputs(model.signature.spec, query.dense, query.sparse))
    outputs = asyncio.run(engine.infer("rmc1", "", request, None, "http"))
    return outputs["scores"], scores_in_process(Path(model.folder), query.dense, query.sparse)


def inline_lookups(engine: InferenceServer) -> int:
    return engine.model("rmc1").executor._inline.counts()["rmc1_t0"].lookups  # type: ignore[attr-defined]


def test_a_small_query_on_a_quiet_model_runs_inline_off_the_loop(engine: InferenceServer) -> None:
    executor = engine.model("rmc1").executor
    for _ in range(5):  # until the worker was idle throughout (its driver's idle wake-up takes it a moment)
        parked_worker(executor)
        if not executor.would_run_inline(2):
            continue
        assert not executor.would_run_inline(5)  # over the limit of 4 items
        before = inline_lookups(engine)
        served, expected = infer(engine, 2, seed=1)
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
        if inline_lookups(engine) == before + 1:
            return
    raise AssertionError("a small query on a quiet model never ran inline")


def test_bigger_queries_take_the_usual_way(engine: InferenceServer) -> None:
    parked_worker(engine.model("rmc1").executor)
    before = inline_lookups(engine)
    served, expected = infer(engine, 6, seed=2)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert inline_lookups(engine) == before
    assert engine.statistics["rmc1"].inference_count >= 6
