"""The DeepRecSched policy, tested as the pure function it is: no server, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recserve.errors import InvalidInputError
from recserve.sched.policy import (
    CostModel,
    QueryInfo,
    SchedulerKnobs,
    admit,
    estimate_s,
    item_ranges,
    plan,
    priority,
)

KNOBS = SchedulerKnobs(batch_size=64, num_workers=2, threads_per_worker=1, accelerator_threshold=512, max_queue=4)


def query(num_items: int, deadline_s: float = 1.0, query_id: int = 0, arrival_s: float = 0.0) -> QueryInfo:
    return QueryInfo(query_id=query_id, num_items=num_items, arrival_s=arrival_s, deadline_s=deadline_s)


@given(num_items=st.integers(0, 5000), batch_size=st.integers(1, 700))
def test_item_ranges_cover_the_query_in_order(num_items: int, batch_size: int) -> None:
    ranges = item_ranges(num_items, batch_size)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(num_items))
    assert all(0 < stop - start <= batch_size for start, stop in ranges)


def test_big_queries_go_to_the_accelerator_only_when_there_is_one() -> None:
    assert plan(query(600), KNOBS, accelerator_available=True).route == "accelerator"
    assert plan(query(600), KNOBS, accelerator_available=True).sub_batches == ((0, 600),)
    cpu = plan(query(600), KNOBS, accelerator_available=False)
    assert cpu.route == "cpu" and len(cpu.sub_batches) == 10  # T ignored without an accelerator
    assert plan(query(511), KNOBS, accelerator_available=True).route == "cpu"


def test_admission_refuses_full_queues_and_hopeless_deadlines() -> None:
    assert admit(query(10), queued=3, knobs=KNOBS, now_s=0.0, estimated_s=0.1).admitted
    full = admit(query(10), queued=4, knobs=KNOBS, now_s=0.0, estimated_s=0.1)
    assert not full.admitted and "queue full (4 of 4" in full.reason
    late = admit(query(10, deadline_s=0.05), queued=0, knobs=KNOBS, now_s=0.0, estimated_s=0.1)
    assert not late.admitted and "estimated 50.0 ms late" in late.reason


def test_earliest_deadline_first_with_stable_ties() -> None:
    queries = [query(1, 0.3, 0), query(1, 0.1, 1), query(1, 0.1, 2, arrival_s=-1), query(1, 0.2, 3)]
    assert [q.query_id for q in sorted(queries, key=priority)] == [2, 1, 3, 0]


def test_estimates_grow_with_work_and_shrink_with_workers() -> None:
    one = SchedulerKnobs(batch_size=64, num_workers=1, threads_per_worker=2)
    two = SchedulerKnobs(batch_size=64, num_workers=2, threads_per_worker=1)
    assert estimate_s(256, one, 1e-5, 1e-3, 0) == pytest.approx(4 * 1e-3 + 256e-5)
    assert estimate_s(256, two, 1e-5, 1e-3, 0) == pytest.approx((4 * 1e-3 + 256e-5) / 2)
    assert estimate_s(256, two, 1e-5, 1e-3, 512) > estimate_s(256, two, 1e-5, 1e-3, 0)
    assert estimate_s(10, two, 1e-5, 1e-3, 0) == pytest.approx(1e-3 + 10e-5)  # one sub-batch: no sharing


@pytest.mark.parametrize("field", ["batch_size", "num_workers", "threads_per_worker", "max_queue"])
def test_knobs_must_be_positive(field: str) -> None:
    values = {"batch_size": 1, "num_workers": 1, "threads_per_worker": 1, "max_queue": 1, field: 0}
    with pytest.raises(InvalidInputError, match=f"{field} must be >= 1, got 0"):
        SchedulerKnobs(**values)


@given(per_batch=st.floats(0, 0.01), per_item=st.floats(1e-6, 1e-3),
       sizes=st.lists(st.integers(1, 512), min_size=2, max_size=40).filter(lambda s: len(set(s)) > 1))
def test_cost_model_recovers_a_linear_cost(per_batch: float, per_item: float, sizes: list[int]) -> None:
    model = CostModel()
    for items in sizes:
        model.observe(items, per_batch + per_item * items)
    fitted_batch, fitted_item = model.coefficients()
    assert fitted_item == pytest.approx(per_item, rel=1e-4, abs=1e-9)
    assert fitted_batch == pytest.approx(per_batch, rel=1e-3, abs=1e-8)


def test_cost_model_with_one_size_puts_the_cost_on_items_and_forgets_old_load() -> None:
    model = CostModel(decay=0.5)
    assert model.coefficients() == (0.0, 0.0)
    model.observe(64, 0.064)
    assert model.coefficients() == (0.0, pytest.approx(0.001))
    for _ in range(30):  # the machine got 10x faster: the old figure fades
        model.observe(64, 0.0064)
    assert model.coefficients()[1] == pytest.approx(0.0001, rel=1e-3)
