"""Online re-tuning: while serving, notice when the load or the tail latency drifts, and hill-climb again on the
live traffic (DeepRecSys tuned once, offline).

Live traffic cannot be pushed to a chosen QPS, so the objective differs from the offline tuner's: at the load
that is arriving, the best setting is the one with the lowest tail latency (counting refused queries as
infinitely late), which is also the one with the most headroom. Pure policy: `OnlineTuner.observe` takes what
the server saw over one window and returns a typed decision; the server applies it and reports the next window.

    steady --(load moved by > drift since the last tune, or the tail is over target)--> exploring
    exploring: each neighbour of the current setting serves one window; the best (lower tail by > margin)
               becomes current and its neighbours are tried in turn; none better -> steady at the new load.
    A window with too few queries says nothing; a load that moves by > drift during exploring restarts it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from recserve.sched.tuner import Setting, neighbours

HISTORY = 200  # decisions kept


@dataclass(frozen=True, slots=True)
class Window:
    """What one model's traffic did over one window of time."""

    seconds: float
    queries: int  # answered and refused
    refused: int
    tail_ms: float  # the percentile the tuner watches, over answered queries

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else 0.0

    @property
    def score_ms(self) -> float:
        """Tail latency with refusals counted as infinitely late: a setting that refuses is worst."""
        if self.queries and self.refused / self.queries > 0.01:
            return math.inf
        return self.tail_ms


class WindowRecorder:
    """Collects one model's outcomes as they happen; `take` closes the window and opens the next."""

    def __init__(self, percentile: float = 95.0) -> None:
        self.percentile = percentile
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._refused = 0
        self._opened = time.monotonic()

    def answered(self, latency_s: float) -> None:
        with self._lock:
            self._latencies.append(latency_s)

    def refused(self) -> None:
        with self._lock:
            self._refused += 1

    def take(self) -> Window:
        with self._lock:
            latencies, refused, opened = self._latencies, self._refused, self._opened
            self._latencies, self._refused, self._opened = [], 0, time.monotonic()
        tail = float(np.percentile(latencies, self.percentile)) * 1e3 if latencies else 0.0
        return Window(seconds=self._opened - opened, queries=len(latencies) + refused, refused=refused,
                      tail_ms=tail)


@dataclass(frozen=True, slots=True)
class Decision:
    setting: Setting | None  # what to serve the next window with; None: keep the current one
    reason: str


@dataclass
class OnlineTuner:
    current: Setting
    cores: int
    max_batch: int
    target_ms: float
    drift: float = 0.25  # relative change of load that triggers a re-tune
    margin: float = 0.1  # relative drop of the tail that counts as better (below it is noise)
    min_queries: int = 30  # fewer queries in a window: no conclusion
    max_moves: int = 6  # moves per re-tune, at most
    accelerator: bool = False  # T is a knob too
    state: Literal["warming", "steady", "exploring"] = "warming"
    tuned_qps: float = 0.0  # the load the current setting was chosen for
    history: list[tuple[float, str]] = field(default_factory=list)  # (load, reason) of every decision
    _baseline: Window | None = None  # the current setting's window, the one candidates must beat
    _candidates: list[Setting] = field(default_factory=list)
    _trying: Setting | None = None
    _scores: dict[Setting, float] = field(default_factory=dict)
    _moves: int = 0
    _stuck_over: bool = False

    def reset(self, setting: Setting) -> None:
        """Someone set the knobs by hand: start over from there, with a fresh reference load."""
        self.current, self.state, self._trying, self._candidates = setting, "warming", None, []

    def state_dict(self) -> dict[str, object]:
        return {"state": self.state, "current": str(self.current), "trying": str(self._trying or ""),
                "tuned_qps": round(self.tuned_qps, 2), "target_ms": self.target_ms,
                "history": [{"qps": round(qps, 2), "decision": why} for qps, why in self.history[-20:]]}

    def observe(self, window: Window) -> Decision:
        if window.queries < self.min_queries:
            return Decision(None, "too few queries to judge")
        if self.state == "exploring":
            return self._explore(window)
        if self.state == "warming":  # the first full window: the reference load
            self.state, self.tuned_qps = "steady", window.qps
            return Decision(None, "reference load taken")
        drifted = self._moved(window.qps, self.tuned_qps)
        # over target again after a re-tune at this load found nothing better: wait for the load to change
        over = window.score_ms > self.target_ms and not self._stuck_over
        if not (drifted or over):
            return Decision(None, "steady")
        why = (f"load {self.tuned_qps:.1f} -> {window.qps:.1f} qps" if drifted else
               f"p-tail {window.tail_ms:.1f} ms over the {self.target_ms:g} ms target")
        return self._start(window, why)

    def _start(self, window: Window, why: str) -> Decision:
        self.state, self._moves, self._scores, self._stuck_over = "exploring", 0, {}, False
        self._baseline = window
        self._scores[self.current] = window.score_ms
        self._candidates = neighbours(self.current, self.cores, self.max_batch, self.accelerator)
        return self._next(f"re-tuning ({why})", window.qps)

    def _next(self, why: str, qps: float) -> Decision:
        """Try the next untried neighbour, or settle on the best found."""
        while self._candidates:
            candidate = self._candidates.pop(0)
            if candidate not in self._scores:
                self._trying = candidate
                return self._decide(candidate, f"{why}: trying {candidate}", qps)
        best = min(self._scores, key=self._scores.__getitem__)
        better = self._scores[best] < self._scores[self.current] * (1 - self.margin)
        if better and self._moves < self.max_moves:  # climb: the neighbours of the new best
            self.current, self._moves = best, self._moves + 1
            self._candidates = neighbours(best, self.cores, self.max_batch, self.accelerator)
            return self._next(f"moved to {best}", qps)
        self.state, self.tuned_qps, self._trying = "steady", qps, None
        self._stuck_over = self._scores[self.current] > self.target_ms
        return self._decide(self.current, f"settled on {self.current}", qps)

    def _explore(self, window: Window) -> Decision:
        assert self._trying is not None
        if self._baseline is not None and self._moved(window.qps, self._baseline.qps):
            # the load moved under the comparison: judge nothing from this window, re-measure the current setting
            self._baseline, self._scores, self._trying = None, {}, self.current
            self._candidates = neighbours(self.current, self.cores, self.max_batch, self.accelerator)
            return self._decide(self.current, f"load moved to {window.qps:.1f} qps: re-measuring {self.current}",
                                window.qps)
        if self._baseline is None:
            self._baseline = window
        self._scores[self._trying] = window.score_ms
        return self._next(f"{self._trying} scored {window.score_ms:.1f} ms", window.qps)

    def _moved(self, qps: float, reference: float) -> bool:
        return abs(qps - reference) > self.drift * max(reference, 1e-9)

    def _decide(self, setting: Setting, reason: str, qps: float) -> Decision:
        self.history.append((qps, reason))
        del self.history[:-HISTORY]  # a server runs for months: keep the recent decisions only
        return Decision(setting, reason)
