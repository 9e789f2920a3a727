"""Online re-tuning in the server: a thread per model that asks for it, closing a window of live traffic every
`window_s`, handing it to the model's `OnlineTuner` and applying its decision through the control API."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from recserve.sched.online import OnlineTuner, WindowRecorder

if TYPE_CHECKING:
    from recserve.serve.engine import InferenceServer
    from recserve.serve.repository import ServedModel

log = logging.getLogger(__name__)


def tuner_for(model: ServedModel) -> OnlineTuner:
    online = model.config.online_tuning
    return OnlineTuner(
        current=model.executor.setting, cores=os.cpu_count() or 1, accelerator=model.executor.accelerator_available,
        max_batch=model.config.max_items, target_ms=model.executor.latency_target_s * 1e3, drift=online.drift,
        margin=online.margin, min_queries=online.min_queries,
    )


class OnlineTuning:
    """Re-tunes the models whose recorder and tuner the server made, a thread a model (started for a model loaded
    later too); stops with the server."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._started = False
        self._lock = threading.Lock()
        server.on_load.append(self.watch)

    def start(self) -> None:
        with self._lock:
            self._started = True
        for name in list(self._server.tuners):
            self.watch(name)

    def watch(self, name: str) -> None:
        """Re-tune `name` from now on, if it asks for it (a model loaded after the start)."""
        with self._lock:
            if not self._started or name in self._threads or name not in self._server.tuners:
                return
            thread = threading.Thread(target=self._run, args=(name,), name=f"online-tuning-{name}", daemon=True)
            self._threads[name] = thread
        thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads.values()):
            thread.join(timeout=60)

    def _run(self, name: str) -> None:
        window_s = self._server.models[name].config.online_tuning.window_s
        while not self._stop.wait(window_s):
            try:
                self.step(name)
            except Exception:  # the tuner must never take the server down; the next window tries again
                log.exception("online tuning of %s failed", name)

    def step(self, name: str) -> None:
        recorder: WindowRecorder | None = self._server.windows.get(name)
        if recorder is None:  # unloaded, or reloaded without online tuning: nothing to tune until it is back
            return
        window = recorder.take()
        with self._server.tuning_lock(name):
            tuner = self._server.tuners.get(name)
            if tuner is None:
                return
            decision = tuner.observe(window)
            if decision.setting is None:
                return
            log.info("online tuning of %s: %s", name, decision.reason)
            executor = self._server.model(name).executor
            if decision.setting != executor.setting:
                executor.apply(decision.setting)
        recorder.take()  # the change's transient (workers starting) belongs to no setting's window
