"""The online re-tuner as a pure policy, driven by a synthetic live system."""

from __future__ import annotations

import math

from recserve.sched.online import OnlineTuner, Window
from recserve.sched.tuner import Setting


def tail_ms(setting: Setting, qps: float) -> float:
    """A live system whose best B is 64 and which prefers two workers; the tail grows with load."""
    return (10 + 4 * abs(math.log2(setting.batch_size / 64)) + (3 if setting.num_workers == 1 else 0)) * (
        1 + qps / 100)


def window(setting: Setting, qps: float, seconds: float = 5.0) -> Window:
    return Window(seconds=seconds, queries=int(qps * seconds), refused=0, tail_ms=tail_ms(setting, qps))


def run(tuner: OnlineTuner, loads: list[float]) -> Setting:
    """Serve one window per load, applying each decision; returns the setting in force at the end."""
    serving = tuner.current
    for qps in loads:
        decision = tuner.observe(window(serving, qps))
        if decision.setting is not None:
            serving = decision.setting
    return serving


def new_tuner() -> OnlineTuner:
    return OnlineTuner(current=Setting(512, 1, 2), cores=2, max_batch=512, target_ms=1000.0)


def test_a_steady_load_changes_nothing() -> None:
    tuner = new_tuner()
    assert run(tuner, [20.0] * 10) == Setting(512, 1, 2)
    assert tuner.state == "steady" and tuner.history == []


def test_a_load_drift_climbs_to_the_best_setting_and_settles_there() -> None:
    tuner = new_tuner()
    serving = run(tuner, [20.0] * 2 + [40.0] * 40)
    assert serving == tuner.current == Setting(64, 2, 1)
    assert tuner.state == "steady" and tuner.tuned_qps == 40.0
    assert tuner.history[0][1].startswith("re-tuning (load 20.0 -> 40.0 qps)")
    assert tuner.history[-1][1] == "settled on B=64 W=2 k=1"
    settled_after = len(tuner.history)
    run(tuner, [40.0] * 5)  # settled: no more changes at this load
    assert len(tuner.history) == settled_after


def test_windows_with_too_few_queries_say_nothing() -> None:
    tuner = new_tuner()
    for qps in (20.0, 20.0, 1.0, 1.0):  # 5 queries a window
        assert tuner.observe(window(tuner.current, qps)).setting is None
    assert tuner.state == "steady"


def test_a_load_moving_during_exploration_judges_nothing_from_it() -> None:
    tuner = new_tuner()
    run(tuner, [20.0, 20.0, 40.0])  # drift: the first candidate now serves
    trying = tuner._trying
    decision = tuner.observe(window(trying, 80.0))  # the load doubled under the candidate
    assert decision.setting == Setting(512, 1, 2) and "re-measuring" in decision.reason
    assert trying not in tuner._scores  # the mismatched window was not scored


def test_a_tail_over_target_retunes_once_then_waits_for_the_load_to_change() -> None:
    tuner = OnlineTuner(current=Setting(64, 2, 1), cores=2, max_batch=512, target_ms=5.0)  # never met
    run(tuner, [20.0] * 20)
    assert tuner.history[0][1].startswith("re-tuning (p-tail")
    assert tuner.current == Setting(64, 2, 1)  # already the best
    decisions = len(tuner.history)
    run(tuner, [20.0] * 5)
    assert len(tuner.history) == decisions


def test_refusals_make_a_setting_worst() -> None:
    assert Window(5.0, 100, 5, tail_ms=1.0).score_ms == math.inf
    assert Window(5.0, 100, 0, tail_ms=1.0).score_ms == 1.0
