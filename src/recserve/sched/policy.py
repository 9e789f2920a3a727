"""DeepRecSched as a pure policy: how to split a query, where to run it, whether to admit it, what runs next.

No threads, clocks or I/O: every function takes the state it needs (including `now_s`) and returns a typed
decision, so the policy is tested without a server and the executor only carries decisions out.

The knobs are DeepRecSys's: B (items per sub-batch: data-level parallelism), W x k (workers, intra-op threads
each: task-level vs data-level parallelism), T (queries of >= T items go whole to the accelerator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from recserve.errors import InvalidInputError

Route = Literal["cpu", "accelerator"]


@dataclass(frozen=True, slots=True)
class SchedulerKnobs:
    batch_size: int  # B: items per sub-batch on the CPU workers
    num_workers: int  # W: concurrent CPU workers
    threads_per_worker: int  # k: intra-op threads of each worker
    accelerator_threshold: int | None = None  # T: route queries of >= T items to the accelerator; None: never
    max_queue: int = 1024  # queries waiting per model, at most

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_workers", "threads_per_worker", "max_queue"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.accelerator_threshold is not None and self.accelerator_threshold < 1:
            raise InvalidInputError(f"accelerator_threshold must be >= 1, got {self.accelerator_threshold}")


@dataclass(frozen=True, slots=True)
class QueryInfo:
    query_id: int
    num_items: int
    arrival_s: float
    deadline_s: float  # absolute: arrival + the model's latency target (or the client's timeout)


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    query_id: int
    route: Route
    sub_batches: tuple[tuple[int, int], ...]  # item ranges [start, stop), in item order, covering the query


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    reason: str = ""  # why not, for the 503 body and the rejection metric's label


def item_ranges(num_items: int, batch_size: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) ranges of at most batch_size items covering 0..num_items in order."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return tuple((s, min(s + batch_size, num_items)) for s in range(0, num_items, batch_size))


def plan(query: QueryInfo, knobs: SchedulerKnobs, accelerator_available: bool) -> SchedulePlan:
    """Big queries go whole to the accelerator (when there is one); others split into sub-batches of B."""
    threshold = knobs.accelerator_threshold
    if accelerator_available and threshold is not None and query.num_items >= threshold:
        return SchedulePlan(query.query_id, "accelerator", ((0, query.num_items),))
    return SchedulePlan(query.query_id, "cpu", item_ranges(query.num_items, knobs.batch_size))


def admit(query: QueryInfo, queued: int, knobs: SchedulerKnobs, now_s: float, estimated_s: float) -> Admission:
    """Refuse at once rather than queue without bound or answer after the deadline.

    `queued`: queries already waiting; `estimated_s`: the executor's estimate of how long this query would take
    from now, waiting included. A query that cannot finish by its deadline is refused now, while the client
    can still go elsewhere, instead of failing late.
    """
    if queued >= knobs.max_queue:
        return Admission(False, f"queue full ({queued} of {knobs.max_queue} queries waiting)")
    if now_s + estimated_s > query.deadline_s:
        late_ms = (now_s + estimated_s - query.deadline_s) * 1e3
        return Admission(False, f"cannot meet the deadline: estimated {late_ms:.1f} ms late")
    return Admission(True)


def priority(query: QueryInfo) -> tuple[float, float, int]:
    """Earliest deadline first; ties by arrival, then id, so the order is total and stable."""
    return (query.deadline_s, query.arrival_s, query.query_id)


def estimate_s(num_items: int, knobs: SchedulerKnobs, per_item_s: float, per_batch_s: float,
               queued_items: int) -> float:
    """Time until a query of num_items would finish: the queued work ahead of it, then its own sub-batches.

    A sub-batch costs per_batch_s + per_item_s x its items (both measured by the executor). W workers share the
    work, but no query finishes before its own largest sub-batch does.
    """
    batches = math.ceil(num_items / knobs.batch_size) + math.ceil(queued_items / knobs.batch_size)
    work = batches * per_batch_s + (num_items + queued_items) * per_item_s
    one_batch = per_batch_s + min(num_items, knobs.batch_size) * per_item_s
    return max(work / knobs.num_workers, one_batch)


@dataclass(slots=True)
class CostModel:
    """Sub-batch compute time ~ per_batch_s + per_item_s x items, fitted online by least squares.

    Old observations fade by `decay` per new one, so the fit follows a machine whose load changes. Until two
    different sizes have been seen, all cost is put on the items.
    """

    decay: float = 0.98
    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def observe(self, items: int, seconds: float) -> None:
        d = self.decay
        self.weight = self.weight * d + 1.0
        self.sum_x = self.sum_x * d + items
        self.sum_y = self.sum_y * d + seconds
        self.sum_xx = self.sum_xx * d + items * items
        self.sum_xy = self.sum_xy * d + items * seconds

    def coefficients(self) -> tuple[float, float]:
        """(per_batch_s, per_item_s), both >= 0; (0, 0) before any observation."""
        if self.weight == 0.0 or self.sum_x == 0.0:
            return 0.0, 0.0
        spread = self.weight * self.sum_xx - self.sum_x * self.sum_x
        if spread <= 1e-9 * self.sum_xx * self.weight:  # one size only: no intercept to fit
            return 0.0, self.sum_y / self.sum_x
        slope = (self.weight * self.sum_xy - self.sum_x * self.sum_y) / spread
        slope = max(slope, 0.0)
        intercept = max((self.sum_y - slope * self.sum_x) / self.weight, 0.0)
        return intercept, slope
