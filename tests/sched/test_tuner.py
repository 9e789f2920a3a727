"""The tuner's search on synthetic latency curves: capacity found within tolerance, noise survived, climb ends."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recserve.errors import InvalidInputError
from recserve.sched.tuner import (
    Capacity,
    Setting,
    batch_grid,
    confirm,
    hill_climb,
    max_qps,
    neighbours,
    tune_against_baseline,
)


def queue_latency(capacity_qps: float, base_ms: float = 5.0) -> callable:
    """An M/M/1-like curve: latency grows without bound as the load approaches capacity."""
    def measure(qps: float) -> float:
        return float("inf") if qps >= capacity_qps else base_ms / (1 - qps / capacity_qps)
    return measure


@given(capacity=st.floats(1.0, 50_000.0), start=st.floats(0.5, 10_000.0))
def test_max_qps_brackets_the_true_capacity(capacity: float, start: float) -> None:
    target_ms = 50.0  # met below 90% of capacity: 5 / (1 - 0.9) = 50
    found = max_qps(queue_latency(capacity), target_ms, start, max_probes=40)
    true = 0.9 * capacity
    assert found.qps <= true + 1e-9
    assert found.qps >= true / 1.1 or true < 0.5  # within the 10% tolerance (unless below min_qps)
    assert all(p.meets == (p.tail_ms <= target_ms) for p in found.probes)


def test_a_target_nothing_meets_returns_zero_not_a_loop() -> None:
    found = max_qps(lambda qps: 1000.0, target_ms=10.0, start_qps=100.0)
    assert found.qps == 0.0 and 1 <= len(found.probes) <= 12
    with pytest.raises(InvalidInputError):
        max_qps(lambda qps: 1.0, target_ms=0.0, start_qps=1.0)


def test_one_noisy_probe_costs_a_bisection_step_not_the_answer() -> None:
    rng = random.Random(3)
    curve = queue_latency(1000.0)
    first = [True]

    def noisy(qps: float) -> float:
        if first[0] and qps > 400:  # the first probe above 400 qps hits a hiccup
            first[0] = False
            return 10_000.0
        return curve(qps) * rng.uniform(0.97, 1.03)

    found = max_qps(noisy, 50.0, start_qps=100.0, max_probes=20)
    assert 300 <= found.qps <= 900


def test_neighbours_keep_workers_times_threads_within_the_cores() -> None:
    around = neighbours(Setting(64, 2, 2), cores=4, max_batch=1024)
    assert Setting(32, 2, 2) in around and Setting(128, 2, 2) in around
    assert Setting(64, 1, 4) in around and Setting(64, 3, 1) in around
    assert all(s.num_workers * s.threads_per_worker <= 4 for s in around)
    assert neighbours(Setting(1, 1, 1), cores=1, max_batch=1) == []


def test_hill_climb_finds_the_peak_and_reports_every_point() -> None:
    def evaluate(s: Setting) -> Capacity:  # best at B=128, W=4 on 4 cores
        batch_penalty = abs((s.batch_size.bit_length() - 1) - 7)
        return Capacity(qps=1000.0 / (1 + batch_penalty) * s.num_workers / 4, probes=())

    result = hill_climb(evaluate, Setting(1024, 1, 4), cores=4, max_batch=1024)
    assert result.best == Setting(128, 4, 1) and result.best_qps == 1000.0
    assert Setting(1024, 1, 4) in result.tried and len(result.tried) >= 5


def test_hill_climb_stops_on_a_plateau() -> None:
    calls = []

    def flat(s: Setting) -> Capacity:
        calls.append(s)
        return Capacity(qps=100.0, probes=())

    result = hill_climb(flat, Setting(64, 1, 2), cores=2, max_batch=512)
    assert result.best == Setting(64, 1, 2) and len(calls) <= 4


def test_hill_climb_measures_a_drop_again_before_stopping() -> None:
    """A stall during one run made the way up look like a drop: measured again, the climb goes on past it."""
    true_qps = {32: 15.0, 64: 40.0, 128: 60.0, 256: 95.0, 512: 87.0}
    stalled = {Setting(128, 2, 1)}  # its first run met a stall
    calls = []

    def evaluate(s: Setting) -> Capacity:
        calls.append(s)
        if s in stalled:
            stalled.discard(s)
            return Capacity(qps=30.0, probes=())
        return Capacity(qps=true_qps[s.batch_size] if s.num_workers == 2 else 5.0, probes=())

    result = hill_climb(evaluate, Setting(64, 2, 1), cores=2, max_batch=512)
    assert result.best == Setting(256, 2, 1) and result.best_qps == 95.0
    assert result.tried[Setting(128, 2, 1)].qps == 60.0  # the better of its two runs
    # each drop costs one more run, once per setting: 128 at the start, 512 at the top
    assert calls.count(Setting(128, 2, 1)) == 2 and calls.count(Setting(512, 2, 1)) == 2
    assert len(calls) == len(set(calls)) + 2


def test_the_climb_reuses_the_baselines_run() -> None:
    calls = []

    def evaluate(s: Setting) -> Capacity:  # two single-threaded workers serve twice what one two-threaded does
        calls.append(s)
        return Capacity(qps=100.0 if s.num_workers == 2 else 50.0, probes=())

    result, baseline = tune_against_baseline(evaluate, max_items=512, cores=2)
    assert calls[0] == Setting(512, 1, 2) and calls.count(Setting(512, 1, 2)) == 1
    assert baseline.qps == 50.0 and result.best_qps == 100.0 and result.tried[Setting(512, 1, 2)] == baseline


def test_neighbours_move_t_only_with_an_accelerator() -> None:
    start = Setting(64, 2, 1)
    assert all(s.accelerator_threshold is None for s in neighbours(start, 2, 512))
    with_t = neighbours(start, 2, 512, accelerator=True)
    assert Setting(64, 2, 1, accelerator_threshold=256) in with_t
    assert set(neighbours(Setting(64, 2, 1, 512), 2, 512, accelerator=True)) >= {
        Setting(64, 2, 1, 256), Setting(64, 2, 1, None)}  # doubled past the largest query: off


def test_confirm_measures_both_in_turn_and_compares_medians() -> None:
    """The tuned setting's figure from the climb was its luckiest; measured again in turn with the baseline, the
    medians give the ratio to expect."""
    baseline, tuned = Setting(512, 1, 2), Setting(128, 2, 1)
    again = {baseline: iter([100.0, 80.0, 120.0]), tuned: iter([150.0, 170.0, 160.0])}
    order: list[Setting] = []

    def evaluate(setting: Setting) -> Capacity:
        order.append(setting)
        return Capacity(next(again[setting]), ())

    confirmation = confirm(evaluate, baseline, 90.0, tuned, 300.0, rounds=3)
    assert order == [tuned, baseline, baseline, tuned, tuned, baseline]  # who goes first alternates
    assert confirmation.tuned_qps == (300.0, 150.0, 170.0, 160.0)
    assert confirmation.baseline_qps == (90.0, 100.0, 80.0, 120.0)
    assert confirmation.tuned_median == 165.0 and confirmation.baseline_median == 95.0
    assert confirmation.ratio == pytest.approx(165.0 / 95.0)  # 300 / 90 from the climb alone
    assert confirm(lambda s: Capacity(0.0, ()), baseline, 0.0, tuned, 10.0, rounds=1).ratio is None


def test_batch_grid_doubles_up_to_a_whole_query() -> None:
    assert batch_grid(512) == [32, 64, 128, 256, 512]
    assert batch_grid(300) == [32, 64, 128, 256, 300]
    assert batch_grid(20) == [20] and batch_grid(1) == [1]


def test_the_scan_finds_a_peak_past_a_dip_the_climb_alone_stops_at() -> None:
    """B=128 measures below B=64 however often it runs; a climb from B=64 stops there, the row's best is 256."""
    true_qps = {32: 100.0, 64: 150.0, 128: 140.0, 256: 200.0, 512: 180.0}

    def evaluate(s: Setting) -> Capacity:
        return Capacity(qps=true_qps[s.batch_size] * (1.0 if s.num_workers == 2 else 0.5), probes=())

    assert hill_climb(evaluate, Setting(64, 2, 1), cores=2, max_batch=512).best == Setting(64, 2, 1)
    result, baseline = tune_against_baseline(evaluate, max_items=512, cores=2)
    assert result.best == Setting(256, 2, 1) and result.best_qps == 200.0 and baseline.qps == 90.0
    assert {Setting(b, 2, 1) for b in (32, 64, 128, 256, 512)} <= set(result.tried)
