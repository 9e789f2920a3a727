"""The inline replica: small queries that find a worker idle run in the serving process, on the caller's thread."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from recserve.models.synthetic import QueryGenerator
from recserve.sched.executor import ServerError
from recserve.sched.inline import InlineReplica
from recserve.serve.repository import ServedModel
from tests.sched.test_executor import _args, parked_worker, scores_in_process, served_rmc1, settled_counts

SERVING = {"scheduler": {"batch_size": 8, "num_workers": 1, "latency_target_ms": 60_000, "max_queue": 64,
                         "inline_max_items": 4},
           "dram": {"num_partitions": 2}}
TABLE = "rmc1_t0"


@pytest.fixture(scope="module")
def rmc1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    yield from served_rmc1(tmp_path_factory, SERVING)


def inline_lookups(served: ServedModel) -> int:
    return served.executor._inline.counts()[TABLE].lookups  # type: ignore[attr-defined]


def submit_until_run_here(executor: object, query: object, attempts: int = 5) -> tuple[object, int]:
    """(the Future of a query that ran on this thread, how many went to a worker before it): a driver's idle
    wake-up (every IDLE_POLL_S) takes its worker for a moment, and a query submitted then waits for the worker
    instead; such a one is answered, and the next attempt made."""
    for queued in range(attempts):
        parked_worker(executor)
        future = executor.submit(*_args(query), run_here=True)  # type: ignore[attr-defined]
        if future.done():
            return future, queued
        future.result(60)
    raise AssertionError(f"the worker was not idle at any of {attempts} submissions")


def test_a_small_query_that_finds_a_worker_idle_runs_inline(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=1).query(3)
    expected = scores_in_process(rmc1.folder, query.dense, query.sparse)
    worker_lookups = settled_counts(executor, TABLE).lookups - inline_lookups(rmc1)
    on_workers = 0
    for _ in range(5):
        before = inline_lookups(rmc1)
        future, queued = submit_until_run_here(executor, query)
        np.testing.assert_allclose(future.result().scores, expected, rtol=1e-5, atol=1e-6)
        assert inline_lookups(rmc1) == before + 1  # one pooled lookup of the table: it ran in this process
        on_workers += queued
    # the table's other lookups are the workers': those of the queries that found no worker idle, no more
    assert settled_counts(executor, TABLE).lookups - inline_lookups(rmc1) == worker_lookups + on_workers
    assert executor.queue_state() == (0, 0)


def test_bigger_or_queued_queries_still_run_on_the_workers(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=2)
    bigger, small = generator.query(6), generator.query(2)  # one sub-batch (B=8), over the inline limit of 4
    parked_worker(executor)
    before = inline_lookups(rmc1)
    result = executor.submit(*_args(bigger), run_here=True).result(60)
    np.testing.assert_allclose(result.scores, scores_in_process(rmc1.folder, bigger.dense, bigger.sparse),
                               rtol=1e-5, atol=1e-6)
    executor.submit(*_args(small)).result(60)  # a caller that does not wait on its own thread: queued
    assert inline_lookups(rmc1) == before


def test_lookups_run_inline_count_with_the_workers(rmc1: ServedModel) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=3).query(2)
    parked_worker(executor)
    before = settled_counts(executor, TABLE)
    executor.submit(*_args(query), run_here=True).result(60)
    after = settled_counts(executor, TABLE)
    assert after.lookups - before.lookups == 1 and after.keys - before.keys == query.sparse.keys[TABLE].numel()
    assert after.hits["dram"] - before.hits["dram"] == after.unique_keys - before.unique_keys > 0
    assert after.not_found == before.not_found


def test_an_inline_query_holds_its_worker_and_runs_only_alone(rmc1: ServedModel,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """While a query runs inline it holds the idle worker it found (so W queries at most compute at once), and a
    query that arrives meanwhile runs on the other idle worker, not inline: this process's GIL is taken."""
    executor = rmc1.executor
    generator = QueryGenerator(rmc1.signature.spec, seed=4)
    first, second = generator.query(1), generator.query(2)
    release, entered = threading.Event(), threading.Event()
    real_run = InlineReplica.run

    def held_run(self: InlineReplica, *args: object) -> object:
        entered.set()
        release.wait(30)
        return real_run(self, *args)

    executor.set_knobs(num_workers=2)
    monkeypatch.setattr(InlineReplica, "run", held_run)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as caller:
            for _ in range(5):  # until both workers were idle when the first was submitted (see above)
                deadline = time.monotonic() + 30
                while sum(w.parked for w in executor._workers) < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
                    time.sleep(0.01)
                before = inline_lookups(rmc1)
                running = caller.submit(lambda: executor.submit(*_args(first), run_here=True).result(60))
                if entered.wait(5):
                    break
                running.result(60)
            else:
                raise AssertionError("the first query never ran inline")
            assert [w.lent for w in executor._workers].count(True) == 1  # type: ignore[attr-defined]
            assert not executor.would_run_inline(1)  # one query in flight already
            meanwhile = executor.submit(*_args(second), run_here=True)
            # answered while the first still holds its worker: on the other one, lent or through its driver
            np.testing.assert_allclose(meanwhile.result(30).scores,
                                       scores_in_process(rmc1.folder, second.dense, second.sparse),
                                       rtol=1e-5, atol=1e-6)
            assert not running.done()
            release.set()
            np.testing.assert_allclose(running.result(60).scores,
                                       scores_in_process(rmc1.folder, first.dense, first.sparse),
                                       rtol=1e-5, atol=1e-6)
        assert inline_lookups(rmc1) - before == 1  # the first only
    finally:
        release.set()
        executor.set_knobs(num_workers=1)
    assert executor.queue_state() == (0, 0)


def test_a_bug_inline_fails_that_query_and_frees_the_worker(rmc1: ServedModel,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    executor = rmc1.executor
    query = QueryGenerator(rmc1.signature.spec, seed=5).query(2)

    def broken_forward(*args: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(executor._inline, "_model", broken_forward)  # type: ignore[attr-defined]
    future, _ = submit_until_run_here(executor, query)
    with pytest.raises(ServerError, match="RuntimeError: a bug"):
        future.result()
    monkeypatch.undo()
    future, _ = submit_until_run_here(executor, query)  # the worker was handed back: lendable again
    np.testing.assert_allclose(future.result().scores, scores_in_process(rmc1.folder, query.dense, query.sparse),
                               rtol=1e-5, atol=1e-6)
    assert executor.queue_state() == (0, 0)
