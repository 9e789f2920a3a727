"""The simulator's queueing against cases with known answers, and its profile's interpolation."""

from __future__ import annotations

import pytest

from recserve.config import ArrivalProcess, LoadConfig, SizeDistribution
from recserve.loadgen.sim import Accelerator, LatencyProfile, profile, simulate, simulated_tune
from recserve.sched.tuner import Setting

FLAT = LatencyProfile((1, 1000), {1: (0.01, 0.01)})  # 10 ms whatever the size


def load(qps: float, items: int = 10, duration_s: float = 1.0, kind: str = "constant") -> LoadConfig:
    return LoadConfig(duration_s=duration_s, arrivals=ArrivalProcess(kind=kind, qps=qps),
                      sizes=SizeDistribution(kind="fixed", items=items, max_items=1000))


def test_an_idle_server_answers_in_the_service_time() -> None:
    samples = simulate(FLAT, Setting(100, 1, 1), load(10.0), target_s=1.0)
    assert len(samples) == 10 and all(s.latency_s == pytest.approx(0.01) for s in samples)


def test_overload_queues_and_more_workers_drain_it() -> None:
    one = simulate(FLAT, Setting(100, 1, 1), load(200.0), target_s=1.0)  # 200 qps into 100 qps of service
    latencies = [s.latency_s for s in one]
    assert latencies[-1] == pytest.approx(200 * 0.01 - 199 / 200, rel=1e-6)  # waits for everyone before it
    two = simulate(FLAT, Setting(100, 2, 1), load(200.0), target_s=1.0)
    assert max(s.latency_s for s in two) == pytest.approx(0.01)  # two workers keep up exactly


def test_sub_batches_run_in_parallel_on_idle_workers() -> None:
    split = simulate(FLAT, Setting(25, 4, 1), load(1.0, items=100), target_s=1.0)  # 4 sub-batches, 4 workers
    assert split[0].latency_s == pytest.approx(0.01)
    serial = simulate(FLAT, Setting(25, 1, 1), load(1.0, items=100), target_s=1.0)
    assert serial[0].latency_s == pytest.approx(0.04)


def test_big_queries_go_to_the_accelerator() -> None:
    accelerator = Accelerator(fixed_s=0.002, per_item_s=0.0)
    samples = simulate(FLAT, Setting(100, 1, 1, accelerator_threshold=50), load(1.0, items=60), 1.0, accelerator)
    assert samples[0].latency_s == pytest.approx(0.002)
    samples = simulate(FLAT, Setting(100, 1, 1, accelerator_threshold=80), load(1.0, items=60), 1.0, accelerator)
    assert samples[0].latency_s == pytest.approx(0.01)  # under T: the CPU worker


def test_profile_interpolates_and_extrapolates_threads_by_amdahl() -> None:
    curve = LatencyProfile((1, 100), {1: (0.001, 0.010), 2: (0.001, 0.006)})
    assert curve.service_s(10, 1) == pytest.approx(0.001 + 0.009 * 9 / 99)
    assert curve.service_s(200, 1) == pytest.approx(0.010 + 0.009 / 99 * 100)
    # at 100 items: serial 2 ms + parallel 8 ms / k fits both points; 8 threads -> 2 + 1 = 3 ms
    assert curve.service_s(100, 8) == pytest.approx(0.003)
    measured = profile(lambda b, k: [(0.001 * b / k, 0.002)] * 3, [1, 10], [1, 2])
    assert measured.seconds == {1: (0.001, 0.01), 2: (0.0005, 0.005)}
    assert measured.overhead_s == 0.002


def test_simulated_tuning_splits_queries_on_many_cores() -> None:
    """Whole queries take ~15 ms on one worker whatever its threads (little intra-op speed-up), over a 12 ms
    target: only queries split over several workers can make it, which the static baseline never does."""
    curve = LatencyProfile((1, 256), {1: (0.0005, 0.02), 2: (0.0005, 0.018)})
    config = LoadConfig(duration_s=5.0, arrivals=ArrivalProcess(qps=10.0),
                        sizes=SizeDistribution(kind="lognormal", mu=5.1, sigma=0.2, max_items=256))
    result, baseline = simulated_tune(curve, config, target_ms=12.0, cores=16)
    assert result.best.num_workers > 1 and result.best.batch_size < 256
    assert result.best_qps > 100 and result.best_qps >= 2 * baseline.qps


def test_with_an_accelerator_the_tuner_climbs_over_t_too() -> None:
    """Big queries are slow on the CPU workers and cheap on the accelerator: the tuner offloads them."""
    curve = LatencyProfile((1, 256), {1: (0.001, 0.05), 2: (0.001, 0.045)})
    accelerator = Accelerator(fixed_s=0.003, per_item_s=0.00001)
    config = LoadConfig(duration_s=5.0, arrivals=ArrivalProcess(qps=10.0),
                        sizes=SizeDistribution(kind="lognormal", mu=5.1, sigma=0.2, max_items=256))
    result, baseline = simulated_tune(curve, config, target_ms=20.0, cores=4, accelerator=accelerator)
    assert result.best.accelerator_threshold is not None
    assert result.best_qps > 2 * baseline.qps
    cpu_only, _ = simulated_tune(curve, config, target_ms=20.0, cores=4)
    assert result.best_qps >= cpu_only.best_qps  # the second climb starts from the CPU-only best


def test_an_idle_worker_pays_its_wake_up_in_proportion_to_the_idle_time() -> None:
    waking = LatencyProfile((1, 1000), {1: (0.01, 0.01)}, wake_s=0.004, idle_s=0.05)
    apart = simulate(waking, Setting(100, 1, 1), load(10.0), target_s=1.0)  # 90 ms idle before each
    assert [round(s.latency_s, 4) for s in apart[1:3]] == [0.014, 0.014]
    close = simulate(waking, Setting(100, 1, 1), load(80.0), target_s=1.0)  # 2.5 ms idle: 5% of the cost
    assert close[1].latency_s == pytest.approx(0.01 + 0.004 * 0.0025 / 0.05)
    busy = simulate(waking, Setting(100, 1, 1), load(200.0), target_s=1.0)  # never idle: no wake-up
    assert busy[5].latency_s == pytest.approx(6 * 0.01 - 5 / 200)
