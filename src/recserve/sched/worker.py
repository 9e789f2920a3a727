"""A worker process: one model replica over the shared parameter server, running the sub-batches it is sent.

Processes, not threads, as DeepRecSys's workers: each sets its own intra-op thread count (k) and runs Python
without sharing a GIL with the front end or its siblings. They share the embeddings all the same: the DRAM tier
is attached from shared memory (one copy for every worker), and its misses are read through the serving
process, which owns the persistent store (`ps/remote.py`). A worker loads only its model's dense weights.

The protocol on the task pipe: the worker first sends `Ready` (or `Ready(error=...)` and exits); then for each
`SubBatch` (its arrays in the worker's mailbox, `mailbox.py`) it answers one `SubBatchDone`; `CountsRequest`
asks for its lookup counters; `None` stops it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from recserve.allocator import retain_freed_memory
from recserve.config import TableConfig
from recserve.errors import InvalidInputError, RecserveError
from recserve.models.specs import ModelSpec
from recserve.ps.dram import DramTableHandle
from recserve.ps.server import HierarchicalPS, LookupCounts
from recserve.ps.tiers import Tier
from recserve.sched.mailbox import Letter, MailboxReader
from recserve.sparse import SparseBatch

WARM_UP_ITEMS = 64
COUNTS_EVERY_S = 0.5  # a busy worker attaches its lookup counters to a result at most this often


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """All a worker needs to build its replica; picklable, sent once at spawn."""

    folder: Path  # the model's checkpoint folder (dense.pt)
    spec: ModelSpec
    tables: list[TableConfig]
    dram: list[DramTableHandle]  # shared-memory tables to attach; empty without a DRAM tier
    remote_tier: str | None  # name of the owner's slower tier, reached over the lookups pipe; None: no such tier
    device: str = "cpu"
    idle_spin_s: float = 0.0  # how long the worker, and whoever waits on it, polls its pipe before sleeping


@dataclass(frozen=True, slots=True)
class Ready:
    error: str = ""


class SubBatch(NamedTuple):
    """Items [start, stop) of one query: its arrays wait in the worker's mailbox (`pack` says which)."""

    task_id: int
    threads: int  # k, applied before running: the knob moves without a message of its own
    letter: Letter


def pack(dense: np.ndarray | None, sparse: SparseBatch) -> dict[str, np.ndarray]:
    """A query's arrays by name, for the mailbox: dense, keys/<table>, offsets/<table>."""
    arrays = {} if dense is None else {"dense": dense}
    for table in sparse.tables:
        arrays[f"keys/{table}"] = sparse.keys[table].numpy()
        arrays[f"offsets/{table}"] = sparse.offsets[table].numpy()
    return arrays


def unpack(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor | None, SparseBatch]:
    dense = torch.from_numpy(arrays["dense"]) if "dense" in arrays else None
    tables = tuple(name.split("/", 1)[1] for name in arrays if name.startswith("keys/"))
    offsets = {t: torch.from_numpy(arrays[f"offsets/{t}"]) for t in tables}
    sparse = SparseBatch(
        tables=tables, keys={t: torch.from_numpy(arrays[f"keys/{t}"]) for t in tables}, offsets=offsets,
        num_items=len(next(iter(offsets.values()))) - 1 if offsets else 0,
    )
    return dense, sparse


class SubBatchDone(NamedTuple):
    task_id: int
    scores: np.ndarray | None  # [items, tasks] float32; None on error
    compute_s: float = 0.0
    error: str = ""
    invalid_input: bool = False  # the error is the request's fault (400), not the server's (500)
    counts: dict[str, LookupCounts] | None = None


@dataclass(frozen=True, slots=True)
class CountsRequest:
    pass


def send(connection: Connection, message: object) -> None:
    """A message on the task pipe, in plain pickle: `Connection.send` pickles through ForkingPickler, which took
    4x as long for these small messages, and nothing sent here needs its reducers (no handles or pipes)."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(connection: Connection, spin_s: float = 0.0) -> Any:
    """The next message; with `spin_s`, the pipe is polled that long before the read blocks (`poll_before_sleep`)."""
    if spin_s > 0:
        poll_before_sleep(connection, spin_s)
    return pickle.loads(connection.recv_bytes())


def poll_before_sleep(connection: Connection, spin_s: float) -> None:
    """Return when `connection` has data or `spin_s` has passed, yielding the core to anything runnable meanwhile.

    Why spin at all: a process that blocks leaves its core idle, and a core woken from idle runs the next
    sub-batch several times slower on machines whose idle cores sleep (a VM's vCPU is descheduled, a bare core
    drops into a deep C-state): a 1-item RMC1 forward took 0.18 ms back to back and 1.0 ms after 8 ms idle here.
    OpenMP's and ONNX Runtime's thread pools spin before they sleep for the same reason. Yielding keeps the cost
    low when another process wants the core: it runs, and the poller only looks in between. `poll` on the
    descriptor: `Connection.poll` builds a selector at every call, and `select` refuses descriptors past 1,023,
    which a server holding a thousand connections hands out to a worker it starts then."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    until = time.monotonic() + spin_s
    while not poller.poll(0):
        if time.monotonic() >= until:
            return
        os.sched_yield()


def worker_main(setup: WorkerSetup, tasks: Connection, lookups: Connection | None) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops its workers
    retain_freed_memory()  # each sub-batch's activations are large allocations
    set_threads(1)
    try:
        model, ps = build_replica(setup, _worker_tiers(setup, lookups))
    except Exception as error:  # reported to the parent, which names it in its own error
        send(tasks, Ready(error=f"{type(error).__name__}: {error}"))
        return
    warm_up(model, setup)
    ps.reset_counts()  # the warm-up's lookups are not traffic
    send(tasks, Ready())
    mailbox = MailboxReader()
    counts_sent_at = 0.0
    with torch.inference_mode():
        while True:
            try:
                message = receive(tasks, setup.idle_spin_s)
            except (EOFError, OSError):
                break
            if message is None:
                break
            if isinstance(message, CountsRequest):
                send(tasks, ps.counts())
                continue
            set_threads(message.threads)
            dense, sparse = unpack(mailbox.read(message.letter))
            done = run_sub_batch(model, message.task_id, dense, sparse, setup.device)
            del dense, sparse  # views into the mailbox: gone before the next letter may remap it
            if time.monotonic() - counts_sent_at >= COUNTS_EVERY_S:
                done = done._replace(counts=ps.counts())
                counts_sent_at = time.monotonic()
            send(tasks, done)
    ps.close()


def _worker_tiers(setup: WorkerSetup, lookups: Connection | None) -> list[Tier]:
    """The DRAM tier attached from shared memory, then the owner's persistent tier over the lookups pipe."""
    from recserve.ps.dram import DramTier
    from recserve.ps.remote import RemoteTier

    tiers: list[Tier] = []
    if setup.dram:
        tiers.append(DramTier.attach(setup.dram))
    if setup.remote_tier is not None and lookups is not None:
        tiers.append(RemoteTier(setup.remote_tier, lookups))
    return tiers


def build_replica(setup: WorkerSetup, tiers: list[Tier]) -> tuple[torch.nn.Module, HierarchicalPS]:
    """The model with its dense weights loaded, over a parameter server of `tiers` (its own counters)."""
    from recserve.models import build_model
    from recserve.models.checkpoint import load_dense

    ps = HierarchicalPS(setup.tables, tiers)
    model = load_dense(build_model(setup.spec, ps), setup.folder).to(setup.device)
    return model, ps


def set_threads(threads: int) -> None:
    """k intra-op threads for torch (the process's) and for the PS's parallel numba kernels (this thread's)
    alike: W x k stays the thread count."""
    import numba

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def warm_up(model: torch.nn.Module, setup: WorkerSetup) -> None:
    """Run a few throwaway queries before reporting ready: torch's first calls of each shape allocate and
    dispatch slowly, and the scheduler's cost model must not learn from them (nor the first client wait)."""
    spec = setup.spec
    for items in (1, WARM_UP_ITEMS):
        features = {
            t.name: (np.zeros(items * t.keys_per_item, dtype=np.int64), np.full(items, t.keys_per_item))
            for t in spec.tables
        }
        dense = torch.zeros(items, spec.dense_features) if spec.dense_features else None
        sparse = SparseBatch.from_lengths(features)
        for _ in range(2):
            done = run_sub_batch(model, 0, dense, sparse, setup.device)
            if done.error:
                raise RuntimeError(f"warm-up query failed: {done.error}")


def run_sub_batch(model: torch.nn.Module, task_id: int, dense: torch.Tensor | None, sparse: SparseBatch,
                  device: str) -> SubBatchDone:
    """Scores of one sub-batch, or the error that stopped it (never raises: the caller lives on)."""
    started = time.perf_counter()
    try:
        scores = model(dense, sparse.to(device) if device != "cpu" else sparse)
        result = scores.detach().to("cpu", torch.float32).numpy()
    except InvalidInputError as error:
        return SubBatchDone(task_id, None, error=str(error), invalid_input=True)
    except RecserveError as error:  # a tier failed (e.g. the persistent store is unreachable)
        return SubBatchDone(task_id, None, error=str(error))
    except Exception as error:  # a bug: reported, and the worker lives on for the next sub-batch
        return SubBatchDone(task_id, None, error=f"{type(error).__name__}: {error}")
    return SubBatchDone(task_id, result, compute_s=time.perf_counter() - started)
