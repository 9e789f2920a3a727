"""The DeepRecSched executor of one model: admit, order, split, run on W worker processes, join.

    submit(query) --admit? (policy.admit)--> OverloadedError (503) at once
                  --plan (policy.plan)--> sub-batches of B items, pushed on an earliest-deadline-first heap
    driver thread per worker: pop the most urgent sub-batch -> send to its process -> wait -> store the part
    last part in -> scores joined in item order -> the query's Future resolves

The policy decides (pure functions in `policy.py`); this module only carries decisions out. One driver thread
per worker process keeps that worker's pipe in one hand: a driver blocks on its worker while the others run,
which is how W sub-batches of one query run at once. The knobs can be changed while serving (`set_knobs`).

A caller that will block on the answer anyway (a front end with a thread per request) may pass `run_here`: a
query of one sub-batch, with nothing queued ahead of it and a worker idle, then runs on that worker from the
caller's thread, its driver standing aside meanwhile. That skips two thread hand-offs (caller -> driver ->
caller), ~0.2 ms of a 1-item query's ~1 ms in the executor on this machine. With an `InlineReplica` (`inline.py`),
a small such query, when no other is in flight, skips the worker process too: it runs on the caller's thread in
this process, the idle worker it found held meanwhile so that no more than W queries compute at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recserve.errors import InvalidInputError, OverloadedError, RecserveError
from recserve.ps.remote import serve_lookups
from recserve.ps.server import LookupCounts
from recserve.ps.tiers import Tier
from recserve.sched import policy
from recserve.sched.inline import InlineReplica
from recserve.sched.mailbox import Mailbox
from recserve.sched.policy import CostModel, QueryInfo, Route, SchedulePlan, SchedulerKnobs
from recserve.sched.tuner import Setting
from recserve.sched.worker import (
    CountsRequest,
    Ready,
    SubBatch,
    SubBatchDone,
    WorkerSetup,
    pack,
    receive,
    send,
    worker_main,
)
from recserve.sparse import SparseBatch

log = logging.getLogger(__name__)

DEFAULT_SHM_DIR = Path("/dev/shm")
IDLE_POLL_S = 0.25  # an idle driver wakes this often to refresh its worker's lookup counters
WORKER_START_TIMEOUT_S = 300.0  # a worker imports torch and attaches every table before it is ready


class ServerError(RecserveError):
    """The server failed a query through no fault of the request (HTTP 500 / gRPC INTERNAL)."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    scores: np.ndarray  # [items, tasks] float32, in item order
    queue_s: float  # arrival -> first sub-batch sent to a worker
    compute_s: float  # summed worker compute time of the sub-batches
    total_s: float  # arrival -> scores joined
    sub_batches: int
    held_s: tuple[float, ...] = ()  # per sub-batch, in item order: how long it held its worker (sent -> answer back)


@dataclass(eq=False)
class _Query:
    info: QueryInfo
    plan: SchedulePlan
    dense: np.ndarray | None
    sparse: SparseBatch
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    parts: list[np.ndarray | None] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    remaining: int = 0
    compute_s: float = 0.0
    first_sent_s: float | None = None

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        start, stop = self.plan.sub_batches[index]
        if (start, stop) == (0, self.info.num_items):
            return pack(self.dense, self.sparse)
        dense = None if self.dense is None else self.dense[start:stop]
        return pack(dense, self.sparse.slice(start, stop))


class WorkerHandle:
    """One worker process seen from the serving process: its task pipe, and a thread serving its misses."""

    def __init__(self, setup: WorkerSetup, route: Route, persistent: Tier | None, name: str,
                 shm_dir: Path = DEFAULT_SHM_DIR) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy torch's and numba's threads mid-flight
        # OpenMP threads (torch's and numba's) spin for a while after each parallel region by default: with W
        # workers on the cores, spinning threads steal the cores their siblings compute on. Sleep instead.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.route = route
        self.retiring = False
        self.parked = False  # its driver waits for work: the worker may be lent to a submitting thread
        self.lent = False  # a submitting thread runs a query on it (`Executor._run_here`): its driver stands aside
        self.broken = False  # it died while lent: its driver replaces it
        self.awaiting_return = False  # its driver woke while it was lent and waits for it to be handed back
        self.counts: dict[str, LookupCounts] = {}
        self.counts_stale = False
        self._mailbox = Mailbox(shm_dir)
        self._idle_spin_s = setup.idle_spin_s
        self._stop_lock, self._stopped = threading.Lock(), False
        self._tasks, child_tasks = context.Pipe()
        child_lookups = None
        if persistent is not None:
            lookups, child_lookups = context.Pipe()
            threading.Thread(target=serve_lookups, args=(persistent, lookups), daemon=True,
                             name=f"{name}-lookups").start()
        self.process = context.Process(target=worker_main, args=(setup, child_tasks, child_lookups),
                                       name=name, daemon=True)
        self.process.start()
        child_tasks.close()
        if child_lookups is not None:
            child_lookups.close()

    def wait_ready(self) -> None:
        if not self._tasks.poll(WORKER_START_TIMEOUT_S):
            self.stop()
            raise ServerError(f"worker {self.process.name} did not start in {WORKER_START_TIMEOUT_S:.0f} s")
        try:
            ready: Ready = receive(self._tasks)
        except (EOFError, OSError):
            raise ServerError(f"worker {self.process.name} died while starting") from None
        if ready.error:
            self.stop()
            raise ServerError(f"worker {self.process.name} could not start: {ready.error}")

    def run(self, task_id: int, threads: int, arrays: dict[str, np.ndarray]) -> SubBatchDone:
        try:
            send(self._tasks, SubBatch(task_id, threads, self._mailbox.put(arrays)))
            done: SubBatchDone = receive(self._tasks, self._idle_spin_s)
        except (EOFError, OSError) as error:
            raise ServerError(f"worker {self.process.name} died (exit code {self.process.exitcode}): "
                              f"{error or 'pipe closed'}") from None
        if done.counts is not None:
            self.counts, self.counts_stale = done.counts, False
        else:
            self.counts_stale = True
        return done

    def refresh_counts(self) -> None:
        try:
            send(self._tasks, CountsRequest())
            self.counts, self.counts_stale = receive(self._tasks), False
        except (EOFError, OSError):
            pass  # a dead worker is noticed, and replaced, on its next sub-batch

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit, then make sure it has; safe to call twice (close and a retiring driver)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.suppress(OSError):
            send(self._tasks, None)
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._tasks.close()
        self._mailbox.close()


class Executor:
    """Runs one model's queries over its worker processes. Thread-safe; `submit` never blocks on the work."""

    def __init__(
        self, name: str, setup: WorkerSetup, knobs: SchedulerKnobs, latency_target_s: float,
        persistent: Tier | None = None, clock: Callable[[], float] = time.monotonic,
        inline: InlineReplica | None = None,
    ) -> None:
        self.name = name
        self._setup = setup
        self._persistent = persistent
        self._inline = inline  # runs small lent queries in this process (see the module's docstring)
        self._clock = clock
        self._knobs = knobs
        self._latency_target_s = latency_target_s
        lock = threading.RLock()  # Future callbacks re-enter it
        self._cond = threading.Condition(lock)  # drivers wait here for sub-batches
        self._handed_back = threading.Condition(lock)  # drivers of lent workers wait here for them
        self._heaps: dict[Route, list] = {"cpu": [], "accelerator": []}
        self._sequence = itertools.count()
        self._workers: list[WorkerHandle] = []
        self._accelerator: WorkerHandle | None = None
        self._cost = {"cpu": CostModel(), "accelerator": CostModel()}
        self._outstanding = 0  # queries admitted and not yet answered
        self._pending_items = 0  # items of sub-batches not yet sent to a worker
        self._retired_counts: list[dict[str, LookupCounts]] = []
        self.rejections: Counter[str] = Counter()
        self._closing = False
        self._resize_lock = threading.Lock()

    # --- lifetime ---

    def start(self) -> Executor:
        self._resize(self._knobs.num_workers)
        if torch.cuda.is_available():
            worker = self._spawn("accelerator")
            worker.wait_ready()
            self._accelerator = worker
            self._start_driver(worker)
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            workers = [*self._workers, *([self._accelerator] if self._accelerator else [])]
            for worker in workers:
                worker.retiring = True
            stranded = [entry[-1] for heap in self._heaps.values() for entry in heap]
            for heap in self._heaps.values():
                heap.clear()
            self._cond.notify_all()
        for query in stranded:
            self._fail(query, OverloadedError(f"model '{self.name}' is shutting down"))
        for worker in workers:
            worker.stop()

    @property
    def accelerator_available(self) -> bool:
        return self._accelerator is not None

    # --- queries ---

    def submit(self, dense: np.ndarray | None, sparse: SparseBatch, timeout_s: float | None = None, *,
               run_here: bool = False) -> concurrent.futures.Future[QueryResult]:
        """Admit a query or refuse it at once (OverloadedError); its Future resolves to a QueryResult.

        run_here: the caller waits for the answer anyway; if the query can run at once on an idle worker, it
        runs on this thread and the Future comes back resolved (see the module's docstring). Never pass it
        from an event loop."""
        if sparse.num_items == 0:
            raise InvalidInputError("empty query: 0 items")
        now = self._clock()
        budget = self._latency_target_s if timeout_s is None else min(timeout_s, self._latency_target_s)
        with self._cond:
            if self._closing:
                raise OverloadedError(f"model '{self.name}' is shutting down")
            knobs = self._knobs
            info = QueryInfo(next(self._sequence), sparse.num_items, now, now + budget)
            plan = policy.plan(info, knobs, self._accelerator is not None)
            per_batch_s, per_item_s = self._cost[plan.route].coefficients()
            estimated = policy.estimate_s(info.num_items, knobs, per_item_s, per_batch_s, self._pending_items)
            admission = policy.admit(info, self._outstanding, knobs, now, estimated)
            if not admission.admitted:
                self.rejections["queue_full" if admission.reason.startswith("queue") else "deadline"] += 1
                raise OverloadedError(f"model '{self.name}': {admission.reason}")
            query = _Query(info, plan, dense, sparse, parts=[None] * len(plan.sub_batches),
                           held=[0.0] * len(plan.sub_batches), remaining=len(plan.sub_batches))
            self._outstanding += 1
            query.future.add_done_callback(self._answered)
            worker = self._lend_idle_worker(plan) if run_here else None
            if worker is None:
                self._enqueue(query)
            inline = worker is not None and self._takes_inline(plan.route, info.num_items, self._outstanding)
        if worker is not None:
            self._run_here(worker, query, inline)
        return query.future

    def would_run_inline(self, num_items: int) -> bool:
        """Whether a query of `num_items` submitted now with `run_here` would run on the inline replica: a caller
        on an event loop asks before handing the query to a thread that may block (a guess: things can change
        before it submits, and the query then just goes the usual way)."""
        with self._cond:
            if self._inline is None or not self._inline.takes(num_items):
                return False  # before planning: a large query's plan lists its many sub-batches
            plan = policy.plan(QueryInfo(-1, num_items, 0.0, 0.0), self._knobs, self._accelerator is not None)
            return (self._takes_inline(plan.route, num_items, in_flight=self._outstanding + 1)
                    and self._idle_worker(plan) is not None)

    def _takes_inline(self, route: Route, num_items: int, in_flight: int) -> bool:
        """Whether a lent query runs on the inline replica: small, on the cpu route, and the only query in flight
        (the lock held). With others in flight this process's GIL is busy with their requests, and workers,
        which have GILs of their own, answered faster: four gRPC clients got 0.76-0.84x the items/s inline."""
        return self._inline is not None and route == "cpu" and in_flight == 1 and self._inline.takes(num_items)

    def _enqueue(self, query: _Query) -> None:
        """Push a query's sub-batches for the drivers (the lock held)."""
        self._pending_items += query.info.num_items
        for index in range(len(query.plan.sub_batches)):
            heapq.heappush(self._heaps[query.plan.route], (policy.priority(query.info), index, query))
        if self._accelerator is None:
            self._cond.notify(len(query.plan.sub_batches))
        else:  # drivers of both routes wait on one condition: wake them all, the right ones take it
            self._cond.notify_all()

    def _lend_idle_worker(self, plan: SchedulePlan) -> WorkerHandle | None:
        """An idle worker (`_idle_worker`), marked lent; None if there is none (the lock held)."""
        worker = self._idle_worker(plan)
        if worker is not None:
            worker.parked, worker.lent = False, True
        return worker

    def _idle_worker(self, plan: SchedulePlan) -> WorkerHandle | None:
        """A worker whose driver waits for work, for a query of one sub-batch with nothing queued ahead of it on
        its route (so earliest-deadline-first still holds); None if there is none (the lock held)."""
        if len(plan.sub_batches) != 1 or self._heaps[plan.route]:
            return None
        for worker in self._workers if plan.route == "cpu" else [self._accelerator]:
            if worker is not None and worker.parked and not worker.retiring:
                return worker
        return None

    def _run_here(self, worker: WorkerHandle, query: _Query, inline: bool) -> None:
        """Run a query of one sub-batch on a lent worker from the submitting thread (or, `inline`, on the inline
        replica in the worker's stead), then hand the worker back."""
        query.first_sent_s = sent = self._clock()
        done: SubBatchDone | None = None
        broken = False
        threads = self._knobs.threads_per_worker
        try:
            if inline:
                assert self._inline is not None
                done = self._inline.run(next(self._sequence), threads, query.dense, query.sparse)
            else:
                done = worker.run(next(self._sequence), threads, query.arrays(0))
        except ServerError as error:  # the worker died
            broken = True
            self._fail(query, error)
        except Exception as error:  # a bug here fails this query, not the caller's thread nor the worker
            log.exception("%s: running a query on a lent worker", self.name)
            self._fail(query, ServerError(f"model '{self.name}': {type(error).__name__}: {error}"))
        finally:
            self._hand_back(worker, broken)
        if done is not None:
            self._finish(query, 0, done, worker.route, self._clock() - sent)

    def _hand_back(self, worker: WorkerHandle, broken: bool) -> None:
        """Return a lent worker to its driver. A driver that slept through the loan is left asleep and its
        worker parked again, lendable at once: waking it at every small query put a thread switch and a wait
        for the GIL in the query's path, and the next query found the worker unparked half the time."""
        with self._cond:
            worker.lent, worker.broken = False, broken
            if worker.awaiting_return:
                self._handed_back.notify_all()
            elif broken or worker.retiring or self._heaps[worker.route]:  # its sleeping driver acts on it now
                self._cond.notify_all()
            else:
                worker.parked = True

    def _answered(self, _future: concurrent.futures.Future) -> None:
        with self._cond:
            self._outstanding -= 1

    # --- knobs ---

    @property
    def knobs(self) -> SchedulerKnobs:
        return self._knobs

    @property
    def setting(self) -> Setting:
        """The knobs a tuner moves (B, W, k, T), as the tuner names them."""
        k = self._knobs
        return Setting(k.batch_size, k.num_workers, k.threads_per_worker, k.accelerator_threshold)

    def apply(self, setting: Setting) -> None:
        """Put a tuner's setting into force (the server's equivalent over HTTP is `loadgen.tuning.HttpControl`)."""
        self.set_knobs(batch_size=setting.batch_size, num_workers=setting.num_workers,
                       threads_per_worker=setting.threads_per_worker,
                       accelerator_threshold=setting.accelerator_threshold)

    @property
    def latency_target_s(self) -> float:
        return self._latency_target_s

    def set_knobs(self, latency_target_s: float | None = None, **changes: int | None) -> SchedulerKnobs:
        """Change B, W, k, T or the queue bound while serving; returns the knobs in force.

        B, T, the bound and the target apply to queries admitted from now on; k to the next sub-batch of each
        worker; W starts or retires worker processes (retiring ones finish their sub-batch first).
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(SchedulerKnobs)}
        if unknown:
            raise InvalidInputError(f"unknown scheduler knobs {sorted(unknown)}")
        knobs = dataclasses.replace(self._knobs, **changes)  # validates
        if latency_target_s is not None and latency_target_s <= 0:
            raise InvalidInputError(f"latency target must be > 0 s, got {latency_target_s}")
        if knobs.num_workers * knobs.threads_per_worker > (os.cpu_count() or 1):
            log.warning("%s: %d workers x %d threads exceed the %d cores", self.name, knobs.num_workers,
                        knobs.threads_per_worker, os.cpu_count())
        with self._cond:
            self._knobs = knobs
            if latency_target_s is not None:
                self._latency_target_s = latency_target_s
        self._resize(knobs.num_workers)
        return self._knobs

    def _resize(self, num_workers: int) -> None:
        with self._resize_lock:
            live = [w for w in self._workers if not w.retiring]
            if len(live) < num_workers:
                new = [self._spawn("cpu") for _ in range(num_workers - len(live))]
                try:
                    for worker in new:
                        worker.wait_ready()
                except BaseException:
                    for worker in new:
                        worker.stop()
                    raise
                with self._cond:
                    self._workers.extend(new)
                for worker in new:
                    self._start_driver(worker)
            elif len(live) > num_workers:
                with self._cond:
                    for worker in live[num_workers:]:
                        worker.retiring = True
                    self._cond.notify_all()

    # --- stats ---

    def lookup_counts(self) -> dict[str, LookupCounts]:
        """Lookup counters of every worker, past and present, and of the inline replica, summed per table."""
        with self._cond:
            snapshots = [*self._retired_counts, *(w.counts for w in self._workers)]
            if self._accelerator is not None:
                snapshots.append(self._accelerator.counts)
        if self._inline is not None:
            snapshots.append(self._inline.counts())
        return sum_counts(snapshots)

    def queue_state(self) -> tuple[int, int]:
        """(queries admitted and unanswered, items not yet sent to a worker)."""
        with self._cond:
            return self._outstanding, self._pending_items

    def num_workers_alive(self) -> int:
        with self._cond:
            return sum(1 for w in self._workers if not w.retiring and w.process.is_alive())

    # --- drivers ---

    def _start_driver(self, worker: WorkerHandle) -> None:
        threading.Thread(target=self._drive, args=(worker,), daemon=True, name=f"{worker.process.name}-driver").start()

    def _drive(self, worker: WorkerHandle) -> None:
        while True:
            picked = self._next_sub_batch(worker)
            if picked is None:
                break
            if picked == "idle":
                if worker.counts_stale:
                    worker.refresh_counts()
                continue
            if picked == "broken":  # it died while lent to a submitting thread
                replacement = self._replace(worker)
                if replacement is None:
                    break
                worker = replacement
                continue
            query, index = picked
            sent = self._clock()
            try:
                done = worker.run(next(self._sequence), self._knobs.threads_per_worker, query.arrays(index))
            except ServerError as error:
                self._fail(query, error)
                replacement = self._replace(worker)
                if replacement is None:
                    break
                worker = replacement
                continue
            self._finish(query, index, done, worker.route, self._clock() - sent)
        self._retire(worker)

    def _next_sub_batch(self, worker: WorkerHandle) -> tuple[_Query, int] | str | None:
        """The most urgent runnable sub-batch for this worker; "idle" after a quiet spell; "broken": it died
        while lent; None: stop."""
        with self._cond:
            heap = self._heaps[worker.route]
            while True:
                if worker.lent:  # its pipe is in a submitting thread's hand until it is handed back
                    worker.awaiting_return = True
                    self._handed_back.wait()
                    worker.awaiting_return = False
                    continue
                if worker.broken:
                    return "broken"
                if worker.retiring:
                    return None
                if not heap:
                    worker.parked = True
                    woke = self._cond.wait(IDLE_POLL_S)
                    worker.parked = False
                    if not woke and not worker.lent:
                        return "idle"
                    continue
                _, index, query = heapq.heappop(heap)
                start, stop = query.plan.sub_batches[index]
                self._pending_items -= stop - start
                if query.future.done():  # failed, cancelled by the client, or shed
                    continue
                now = self._clock()
                if now > query.info.deadline_s:
                    self.rejections["deadline"] += 1
                    waited_ms = (now - query.info.arrival_s) * 1e3
                    self._fail(query, OverloadedError(
                        f"model '{self.name}': deadline passed after {waited_ms:.1f} ms waiting; the server is "
                        "behind, retry later"))
                    continue
                if query.first_sent_s is None:
                    query.first_sent_s = now
                return query, index

    def _finish(self, query: _Query, index: int, done: SubBatchDone, route: Route, held_s: float) -> None:
        if done.scores is None:
            error = InvalidInputError if done.invalid_input else ServerError
            self._fail(query, error(f"model '{self.name}': {done.error}"))
            return
        start, stop = query.plan.sub_batches[index]
        with self._cond:
            self._cost[route].observe(stop - start, done.compute_s)
            query.parts[index] = done.scores
            query.held[index] = held_s
            query.compute_s += done.compute_s
            query.remaining -= 1
            if query.remaining or query.future.done():
                return
        now = self._clock()
        scores = query.parts[0] if len(query.parts) == 1 else np.concatenate(query.parts)  # type: ignore[arg-type]
        result = QueryResult(
            scores=scores, queue_s=(query.first_sent_s or now) - query.info.arrival_s, compute_s=query.compute_s,
            total_s=now - query.info.arrival_s, sub_batches=len(query.parts), held_s=tuple(query.held),
        )
        _resolve(query.future, result)

    def _fail(self, query: _Query, error: Exception) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled or answered meanwhile
            query.future.set_exception(error)

    def _replace(self, dead: WorkerHandle) -> WorkerHandle | None:
        """A worker died mid-sub-batch: start another in its place (unless it was leaving anyway)."""
        log.error("%s: worker %s died (exit code %s)", self.name, dead.process.name, dead.process.exitcode)
        with self._cond:
            if self._closing or dead.retiring:
                return None
        try:
            worker = self._spawn(dead.route)
            worker.wait_ready()
        except ServerError:
            log.exception("%s: could not replace a dead worker", self.name)
            return None
        with self._cond:
            self._retired_counts.append(dead.counts)
            if dead in self._workers:
                self._workers[self._workers.index(dead)] = worker
            elif self._accelerator is dead:
                self._accelerator = worker
        dead.stop()
        return worker

    def _spawn(self, route: Route) -> WorkerHandle:
        """Start a worker process for a route (not yet waited for): the accelerator's runs on CUDA."""
        setup = self._setup if route == "cpu" else dataclasses.replace(self._setup, device="cuda")
        return WorkerHandle(setup, route, self._persistent, f"{self.name}-{route}{next(self._sequence)}")

    def _retire(self, worker: WorkerHandle) -> None:
        with self._cond:
            if worker in self._workers:
                self._workers.remove(worker)
                self._retired_counts.append(worker.counts)
        worker.stop()


def _resolve(future: concurrent.futures.Future, result: QueryResult) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # the client gave up (cancelled) meanwhile
        future.set_result(result)


def sum_counts(snapshots: list[dict[str, LookupCounts]]) -> dict[str, LookupCounts]:
    total: dict[str, LookupCounts] = {}
    for snapshot in snapshots:
        for table, c in snapshot.items():
            if table not in total:
                total[table] = c
                continue
            t = total[table]
            total[table] = LookupCounts(
                t.lookups + c.lookups, t.keys + c.keys, t.unique_keys + c.unique_keys, t.not_found + c.not_found,
                hits=_add(t.hits, c.hits), misses=_add(t.misses, c.misses),
            )
    return total


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in a.keys() | b.keys()}
