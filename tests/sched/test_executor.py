"""The executor with real worker processes over a shared-memory DRAM tier (and RocksDB through the owner)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.errors import InvalidInputError, OverloadedError
from recserve.models.synthetic import QueryGenerator
from recserve.sched.executor import IDLE_POLL_S, ServerError
from recserve.serve.repository import ServedModel, load_model, write_model_folder
from tests.conftest import reference_model

# queries run on the workers only here, lent ones too; tests/sched/test_inline.py covers the inline replica
SERVING = {"scheduler": {"batch_size": 8, "num_workers": 1, "latency_target_ms": 60_000, "max_queue": 64,
                         "inline_max_items": 0},
           "dram": {"num_partitions": 2}}


def scores_in_process(folder: Path, dense: torch.Tensor, sparse: object, dtype: str = "float32") -> np.ndarray:
    model, ps = reference_model(folder, dtype)
    with ps, torch.inference_mode():
        return model(dense, sparse).numpy()


def served_rmc1(tmp_path_factory: pytest.TempPathFactory, serving: dict) -> Iterator[ServedModel]:
    """Tiny RMC1 loaded as the server loads it (workers started), closed after the module's tests."""
    folder = tmp_path_factory.mktemp("repo") / "rmc1"
    write_model_folder(folder, "rmc1", seed=3, serving=serving)
    served = load_model(folder)
    yield served
    served.close()


@pytest.fixture(scope="module")
def rmc1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    yield from served_rmc1(tmp_path_factory, SERVING)


def test_sub_batches_run_on_workers_and_join_in_item_order(rmc1: ServedModel) -> None:
    query = QueryGenerator(rmc1.signature.spec, seed=1).query(50)  # 7 sub-batches of B=8
    result = rmc1.executor.submit(query.dense.numpy(), query.sparse).result(60)
    expected = scores_in_process(rmc1.folder, query.dense, query.sparse)
    assert result.sub_batches == 7
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert result.total_s >= result.queue_s >= 0 and result.compute_s > 0


def settled_counts(executor: object, table: str) -> object:
    """Lookup counters once they stop moving (an idle worker reports within IDLE_POLL_S)."""
    previous = None
    for _ in range(100):
        current = executor.lookup_counts().get(table)  # type: ignore[attr-defined]
        if current is not None and current == previous:
            return current
        previous = current
        time.sleep(IDLE_POLL_S + 0.1)
    raise AssertionError("lookup counters never settled")


def test_workers_count_their_lookups(rmc1: ServedModel) -> None:
    table = "rmc1_t0"
    rmc1.executor.submit(*_args(QueryGenerator(rmc1.signature.spec, seed=1).query(1))).result(60)
    before = settled_counts(rmc1.executor, table)
    query = QueryGenerator(rmc1.signature.spec, seed=2).query(8)
    rmc1.executor.submit(query.dense.numpy(), query.sparse).result(60)
    after = settled_counts(rmc1.executor, table)
    # 640 keys of a 1,000-row table: the DRAM tier dedupes them before reading (ps/dram.py, lookup_pooled)
    unique = np.unique(query.sparse.keys[table].numpy()).size
    assert after.lookups - before.lookups == 1
    assert after.unique_keys - before.unique_keys == unique
    assert after.hits["dram"] - before.hits["dram"] == unique and after.not_found == 0


def test_knobs_change_while_serving(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=4).query(40)
    expected = executor.submit(query.dense.numpy(), query.sparse).result(60).scores
    try:
        executor.set_knobs(num_workers=2, batch_size=16, threads_per_worker=1)
        assert executor.num_workers_alive() == 2
        result = executor.submit(query.dense.numpy(), query.sparse).result(60)
        assert result.sub_batches == 3
        np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    finally:
        executor.set_knobs(num_workers=1, batch_size=8)
    deadline = time.monotonic() + 30
    while executor.num_workers_alive() != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert executor.num_workers_alive() == 1
    with pytest.raises(InvalidInputError, match="batch_size must be >= 1"):
        executor.set_knobs(batch_size=0)
    with pytest.raises(InvalidInputError, match="unknown scheduler knobs"):
        executor.set_knobs(batch_sise=4)
    assert executor.knobs.batch_size == 8


def test_a_full_queue_refuses_at_once_and_recovers(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=5)
    queries = [generator.query(64) for _ in range(6)]
    executor.set_knobs(max_queue=2)
    try:
        futures, refused = [], []
        for q in queries:
            try:
                futures.append(executor.submit(q.dense.numpy(), q.sparse))
            except OverloadedError as error:
                refused.append(str(error))
        assert len(futures) == 2 and len(refused) == 4
        assert "queue full (2 of 2 queries waiting)" in refused[0]
        for future in futures:
            assert future.result(60).scores.shape == (64, 1)
    finally:
        executor.set_knobs(max_queue=64)
    assert executor.rejections["queue_full"] >= 4
    q = queries[-1]
    assert executor.submit(q.dense.numpy(), q.sparse).result(60).scores.shape == (64, 1)


def test_a_query_that_cannot_meet_its_deadline_is_refused(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=6)
    executor.submit(*_args(generator.query(16))).result(60)  # the cost model learns from a query or two
    with pytest.raises(OverloadedError, match="cannot meet the deadline: estimated .* ms late"):
        executor.submit(*_args(generator.query(512)), timeout_s=1e-6)  # 64 sub-batches in a microsecond
    assert executor.rejections["deadline"] >= 1


def test_earliest_deadline_first(rmc1: ServedModel) -> None:
    generator = QueryGenerator(rmc1.signature.spec, seed=10)
    relaxed = rmc1.executor.submit(*_args(generator.query(512)))  # 64 sub-batches, deadline in a minute
    urgent = rmc1.executor.submit(*_args(generator.query(8)), timeout_s=30.0)
    assert urgent.result(60).scores.shape == (8, 1)
    assert not relaxed.done()  # the urgent query overtook the relaxed one's remaining sub-batches
    assert relaxed.result(60).scores.shape == (512, 1)


def test_a_query_whose_deadline_passes_in_the_queue_is_shed(rmc1: ServedModel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=11)
    blocker = executor.submit(*_args(generator.query(2048)), timeout_s=30.0)
    doomed = executor.submit(*_args(generator.query(8)), timeout_s=30.5)
    monkeypatch.setattr(executor, "_clock", lambda: time.monotonic() + 3600)  # an hour passes in the queue
    with pytest.raises(OverloadedError, match="deadline passed after"):
        doomed.result(60)
    monkeypatch.undo()
    with pytest.raises(OverloadedError):
        blocker.result(60)  # its remaining sub-batches were late too: shed as a whole, not half answered
    assert executor.submit(*_args(generator.query(8))).result(60).scores.shape == (8, 1)


def test_a_cancelled_query_is_dropped(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=7)
    blocker = executor.submit(*_args(generator.query(256)))
    cancelled = executor.submit(*_args(generator.query(256)))
    assert cancelled.cancel()
    assert blocker.result(60).scores.shape == (256, 1)
    deadline = time.monotonic() + 10
    while executor.queue_state() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert executor.queue_state() == (0, 0)  # the cancelled query's sub-batches were skipped, not run


def test_bad_input_fails_the_query_not_the_worker(rmc1: ServedModel) -> None:
    query = QueryGenerator(rmc1.signature.spec, seed=8).query(4)
    with pytest.raises(InvalidInputError, match="dense must be"):
        rmc1.executor.submit(query.dense.numpy()[:, :5], query.sparse).result(60)
    assert rmc1.executor.submit(*_args(query)).result(60).scores.shape == (4, 1)


def test_a_dead_worker_fails_its_query_and_is_replaced(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=9)
    pid = executor._workers[0].process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ServerError, match="died"):
        executor.submit(*_args(generator.query(4))).result(60)
    deadline = time.monotonic() + 120
    while executor.num_workers_alive() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    query = generator.query(16)
    result = executor.submit(*_args(query)).result(120)
    np.testing.assert_allclose(result.scores, scores_in_process(rmc1.folder, query.dense, query.sparse),
                               rtol=1e-5, atol=1e-6)


def parked_worker(executor: object) -> object:
    """The executor's worker once its driver waits for work (it stops waiting briefly every IDLE_POLL_S)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        worker = executor._workers[0]  # type: ignore[attr-defined]
        if worker.parked:
            return worker
        time.sleep(0.01)
    raise AssertionError("the worker's driver never waited for work")


def test_a_caller_that_waits_anyway_runs_its_query_on_an_idle_worker(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=13).query(5)  # one sub-batch of B=8
    expected = scores_in_process(rmc1.folder, query.dense, query.sparse)
    ran_here = 0
    for _ in range(5):
        parked_worker(executor)
        future = executor.submit(*_args(query), run_here=True)
        ran_here += future.done()  # run on this thread: answered before submit returned
        result = future.result(60)
        assert result.sub_batches == 1
        np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert ran_here >= 1
    assert executor.queue_state() == (0, 0)


def test_back_to_back_small_queries_each_find_the_worker_idle(rmc1: ServedModel) -> None:
    """A lent worker is parked again as it is handed back, its driver left asleep: the caller's next query runs
    on it too, instead of waiting for the driver to wake and park it (it was lent to about half of them)."""
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=17).query(2)
    parked_worker(executor)
    ran_here = 0
    for _ in range(40):
        future = executor.submit(*_args(query), run_here=True)
        ran_here += future.done()
        future.result(60)
    assert ran_here >= 36  # the driver's idle wake-up (every IDLE_POLL_S) may still take the worker briefly


def test_lent_and_queued_queries_mix_without_loss(rmc1: ServedModel) -> None:
    """Threads that run queries on idle workers and queries that wait for a driver, at once: every one is
    answered right, and the workers go back to their drivers."""
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=14)
    queries = [generator.query(size) for size in (1, 3, 8, 20, 2, 30, 5, 7)]  # one and several sub-batches
    expected = [scores_in_process(rmc1.folder, q.dense, q.sparse) for q in queries]

    def call(index: int) -> np.ndarray:
        query = queries[index % len(queries)]
        return executor.submit(*_args(query), run_here=index % 3 != 0).result(60).scores

    with concurrent.futures.ThreadPoolExecutor(6) as callers:
        results = list(callers.map(call, range(48)))
    for index, scores in enumerate(results):
        np.testing.assert_allclose(scores, expected[index % len(queries)], rtol=1e-5, atol=1e-6)
    assert executor.queue_state() == (0, 0)
    parked_worker(executor)  # handed back: its driver waits for work again
    assert executor.submit(*_args(queries[3])).result(60).sub_batches == 3  # and its driver runs queued ones


def test_a_worker_that_dies_while_lent_fails_that_query_and_is_replaced(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=15)
    worker = parked_worker(executor)
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.join(10)
    with pytest.raises(ServerError, match="died"):
        executor.submit(*_args(generator.query(2)), run_here=True).result(60)
    deadline = time.monotonic() + 120
    while executor.num_workers_alive() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    query = generator.query(4)
    result = executor.submit(*_args(query), run_here=True).result(120)
    np.testing.assert_allclose(result.scores, scores_in_process(rmc1.folder, query.dense, query.sparse),
                               rtol=1e-5, atol=1e-6)


def test_a_bug_while_lent_fails_that_query_and_keeps_the_worker(rmc1: ServedModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=16).query(3)
    worker = parked_worker(executor)
    pid = worker.process.pid

    real_run, caller = worker.run, threading.current_thread()

    def broken_run(*args: object) -> object:
        if threading.current_thread() is caller:  # the lent path only; its driver would die of it
            raise RuntimeError("a bug")
        return real_run(*args)

    monkeypatch.setattr(worker, "run", broken_run)
    for _ in range(5):  # until the worker was idle when submitted, and so lent
        parked_worker(executor)
        try:
            executor.submit(*_args(query), run_here=True).result(60)
        except ServerError as error:
            assert "RuntimeError: a bug" in str(error)
            break
    else:
        raise AssertionError("the worker was never lent")
    monkeypatch.undo()
    result = executor.submit(*_args(query), run_here=True).result(60)
    np.testing.assert_allclose(result.scores, scores_in_process(rmc1.folder, query.dense, query.sparse),
                               rtol=1e-5, atol=1e-6)
    assert executor._workers[0].process.pid == pid and executor.queue_state() == (0, 0)


def test_misses_are_read_from_rocksdb_through_the_owner(tmp_path: Path) -> None:
    """DRAM holds a tenth of each table: workers send misses to the serving process, which reads RocksDB."""
    folder = tmp_path / "ncf"
    serving = {**SERVING, "rocksdb": {"enabled": True, "path": "store"}, "dram_fraction": 0.1}
    write_model_folder(folder, "ncf", seed=11, serving=serving)
    served = load_model(folder)
    try:
        query = QueryGenerator(served.signature.spec, seed=12).query(64)
        futures = [served.executor.submit(None, query.sparse) for _ in range(2)]  # 2nd: rows promoted by 1st
        expected = scores_in_process(folder, query.dense, query.sparse)
        for future in concurrent.futures.as_completed(futures, timeout=60):
            np.testing.assert_allclose(future.result().scores, expected, rtol=1e-5, atol=1e-6)
        counts = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = served.executor.lookup_counts()
            if counts and sum(c.hits.get("rocksdb", 0) for c in counts.values()) > 0:
                break
            time.sleep(0.1)
        assert sum(c.hits.get("rocksdb", 0) for c in counts.values()) > 0
        assert all(c.not_found == 0 for c in counts.values())
    finally:
        served.close()


def test_tables_stored_as_bfloat16_serve_the_model_with_rounded_rows(tmp_path: Path) -> None:
    folder = tmp_path / "rmc1"
    write_model_folder(folder, "rmc1", seed=5, serving={**SERVING, "table_dtype": "bfloat16"})
    served = load_model(folder)
    try:
        dram = served.ps.tiers[0]
        assert {dram.table(name).handle.dtype for name in served.ps.tables} == {"bfloat16"}
        query = QueryGenerator(served.signature.spec, seed=6).query(20)
        scores = served.executor.submit(query.dense.numpy(), query.sparse).result(60).scores
        rounded = scores_in_process(folder, query.dense, query.sparse, "bfloat16")
        exact = scores_in_process(folder, query.dense, query.sparse)
        np.testing.assert_allclose(scores, rounded, rtol=1e-5, atol=1e-6)  # the workers read bfloat16 rows
        assert not np.allclose(scores, exact, rtol=1e-5, atol=1e-6)  # ... which are not the float32 ones
        np.testing.assert_allclose(scores, exact, rtol=0.05, atol=0.01)  # ... but near them
    finally:
        served.close()


def _args(query: object) -> tuple:
    return query.dense.numpy(), query.sparse  # type: ignore[attr-defined]
