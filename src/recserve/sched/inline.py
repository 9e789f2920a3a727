"""A model replica in the serving process, for small queries that find a worker idle and the model quiet.

A worker process that sat idle is slow to answer: the pipe wakes it on a core that slept, and its caller sleeps
meanwhile too. For a small query that trip costs as much as the compute. So a query of at most `max_items`
items, whose caller waits on its own thread anyway (`Executor.submit(run_here=True)`: gRPC's handler threads, and
the HTTP front end, which hands such a query from its event loop to a thread when `Executor.would_run_inline`),
and which is the model's only query in flight, runs here on the caller's thread -- holding the idle worker it
found, so that W queries at most compute at once and earliest-deadline-first still holds.

Measured on 2 cores (RMC1 `tiny`, B=256 W=2 k=1, servers with and without it alternated, one gRPC client): p50
1 item 1.70 vs 2.31 ms, 16 items 2.50 vs 3.75 ms, 64 items 3.75 vs 4.91 ms, 256 items 9.2 vs 10.2 ms; one HTTP
client, 1 item: 1.59-1.68 vs 2.03-2.62 ms. Only alone: with other queries in flight this process's GIL is busy
with their requests, and the workers, each with a GIL of its own, did better (four clients got 0.76-0.84x the
items/s when inline runs did not wait to be alone; as it is, 1.03-1.23x). And only small: with every query up to
256 items inline, the demo's tuned setting sustained less (190, 160, 190 against 269, 190, 226 qps,
alternated), its ~165-item queries holding the GIL while others arrived.

The replica reads the tiers the workers read (the DRAM tier, then the persistent store) through a
`HierarchicalPS` of its own: its lookups are counted apart, and closing the owner closes the tiers.
"""

from __future__ import annotations

import numpy as np
import torch

from recserve.ps.server import LookupCounts
from recserve.ps.tiers import Tier
from recserve.sched.worker import SubBatchDone, WorkerSetup, build_replica, run_sub_batch, set_threads, warm_up
from recserve.sparse import SparseBatch, tensor_of


class InlineReplica:
    def __init__(self, setup: WorkerSetup, tiers: list[Tier], max_items: int) -> None:
        self.max_items = max_items
        self._model, self._ps = build_replica(setup, tiers)
        with torch.inference_mode():
            warm_up(self._model, setup)
        self._ps.reset_counts()  # the warm-up's lookups are not traffic

    def takes(self, num_items: int) -> bool:
        return num_items <= self.max_items

    def run(self, task_id: int, threads: int, dense: np.ndarray | None, sparse: SparseBatch) -> SubBatchDone:
        """One query's scores, computed on this thread with k = `threads`; never raises."""
        set_threads(threads)
        with torch.inference_mode():
            return run_sub_batch(self._model, task_id, None if dense is None else tensor_of(dense), sparse, "cpu")

    def counts(self) -> dict[str, LookupCounts]:
        return self._ps.counts()
