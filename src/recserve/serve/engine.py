"""The serving engine both front ends call: the loaded models, inference, statistics, status codes.

The HTTP and gRPC front ends only translate their wire format to `InferRequest` and back; everything else
(validation, admission, scheduling, accounting) happens once, here and below. Errors map to status codes in
one table, `STATUS`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from recserve.errors import (
    CapacityError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    RecserveError,
    TierUnavailableError,
)
from recserve.sched.executor import QueryResult, ServerError
from recserve.sched.online import OnlineTuner, WindowRecorder
from recserve.serve.codec import InferRequest
from recserve.serve.metrics import Metrics
from recserve.serve.online_tuning import tuner_for
from recserve.serve.repository import ServedModel, load_model, model_folders
from recserve.serve.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry, TensorRef
from recserve.sparse import SparseBatch

log = logging.getLogger(__name__)

SERVER_NAME = "recserve"
MODEL_VERSION = "1"
RESULT_GRACE_S = 30.0  # a query is answered or shed by its deadline; waiting longer means a worker hung
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration", "model_repository"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # listed only where clients may use it (--allow-client-shm)

# error class -> (HTTP status, gRPC code, outcome label); the first match in order wins
STATUS: list[tuple[type[BaseException], int, grpc.StatusCode, str]] = [
    (NotFoundError, 404, grpc.StatusCode.NOT_FOUND, "not_found"),
    (InvalidInputError, 400, grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (CapacityError, 503, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    # overload is RESOURCE_EXHAUSTED, not UNAVAILABLE: gRPC clients also get UNAVAILABLE when they cannot connect,
    # and a load generator must tell "refused" from "server gone"
    (OverloadedError, 503, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    (TierUnavailableError, 503, grpc.StatusCode.UNAVAILABLE, "unavailable"),
]


def status_of(error: BaseException) -> tuple[int, grpc.StatusCode, str]:
    for kind, http, code, outcome in STATUS:
        if isinstance(error, kind):
            return http, code, outcome
    return 500, grpc.StatusCode.INTERNAL, "error"


@dataclass
class ModelStatistics:
    """Triton's per-model statistics: items and sub-batches run, time spent by stage (ns)."""

    inference_count: int = 0  # items scored
    execution_count: int = 0  # sub-batches run
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])  # [count, ns]
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute: list[int] = field(default_factory=lambda: [0, 0])


@dataclass
class _Outcome:
    result: QueryResult | None = None


class InferenceServer:
    def __init__(self, repo: Path, online_tuning: bool = False,
                 shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY) -> None:
        self.repo = repo
        self.shared_memory = shared_memory  # the regions clients registered, if the server lets them
        self.models: dict[str, ServedModel] = {}
        self.statistics: dict[str, ModelStatistics] = {}
        self.online_tuning = online_tuning  # re-tune every model online, whatever its serve.yaml says
        self.windows: dict[str, WindowRecorder] = {}  # live traffic of the models tuned online
        self.tuners: dict[str, OnlineTuner] = {}
        self._tuning_locks: dict[str, threading.Lock] = {}
        self.ready = False
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: dict(self.models))
        self._lock = threading.Lock()

    # --- lifetime ---

    def load(self) -> None:
        """Load every model of the repository (blocking); ready once all are in."""
        for folder in model_folders(self.repo):
            started = time.perf_counter()
            model = load_model(folder)
            with self._lock:
                self.models[model.name] = model
                self.statistics[model.name] = ModelStatistics()
                if self.online_tuning or model.config.online_tuning.enabled:
                    self.windows[model.name] = WindowRecorder(model.config.online_tuning.percentile)
                    self.tuners[model.name] = tuner_for(model)
                    self._tuning_locks[model.name] = threading.Lock()
            log.info("model %s loaded in %.1f s", model.name, time.perf_counter() - started)
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.shared_memory.close()
        for model in self.models.values():
            model.close()

    @property
    def extensions(self) -> list[str]:
        return EXTENSIONS + ([SHARED_MEMORY_EXTENSION] if self.shared_memory.enabled else [])

    # --- lookups ---

    def model(self, name: str, version: str = "") -> ServedModel:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none loaded yet"
            raise NotFoundError(f"unknown model '{name}' (serving: {known})")
        if version not in ("", MODEL_VERSION):
            raise NotFoundError(f"model '{name}' has no version '{version}' (serving version {MODEL_VERSION})")
        return model

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.model(name, version).executor.num_workers_alive() > 0
        except NotFoundError:
            return False

    # --- inference ---

    def submit(self, name: str, version: str, request: InferRequest, timeout_s: float | None, *,
               run_here: bool = False) -> concurrent.futures.Future[QueryResult]:
        """Check the request against the model and admit it (or raise); the Future resolves to its result.
        run_here: as `Executor.submit` (a caller on its own thread, never the event loop)."""
        model, dense, sparse = self._decode(name, version, request)
        return model.executor.submit(dense, sparse, timeout_s, run_here=run_here)

    def _decode(self, name: str, version: str, request: InferRequest) -> tuple[ServedModel, np.ndarray | None,
                                                                                 SparseBatch]:
        model = self.model(name, version)
        unknown = [o for o in request.outputs if o not in {t.name for t in model.signature.outputs}]
        if unknown:
            raise InvalidInputError(f"model '{name}' has no outputs {unknown} (it has: scores)")
        dense, sparse = model.signature.decode(request.inputs)
        return model, dense, sparse

    async def infer(self, name: str, version: str, request: InferRequest, timeout_s: float | None,
                    protocol: str) -> dict[str, np.ndarray]:
        """Scores of one request, for a front end on the event loop; raises a RecserveError on anything wrong.
        A query the inline replica would take goes to a thread that runs it there (the loop must not block)."""
        with self._accounted(name, protocol) as outcome:
            model, dense, sparse = self._decode(name, version, request)
            executor = model.executor
            if executor.would_run_inline(sparse.num_items):
                future = await asyncio.to_thread(executor.submit, dense, sparse, timeout_s, run_here=True)
            else:
                future = executor.submit(dense, sparse, timeout_s)
            outcome.result = await asyncio.wrap_future(future)
        return {"scores": outcome.result.scores}

    def infer_blocking(self, name: str, version: str, request: InferRequest, timeout_s: float | None,
                       protocol: str, on_abandon: Callable[[Callable[[], object]], object]) -> dict[str, np.ndarray]:
        """As `infer`, for a front end with a thread per request; `on_abandon` registers what to call if the
        client goes away (the query is then dropped from the queue)."""
        with self._accounted(name, protocol) as outcome:
            # this thread would only wait: an idle worker runs the query straight from it
            future = self.submit(name, version, request, timeout_s, run_here=True)
            on_abandon(future.cancel)
            wait_s = (timeout_s or self.models[name].executor.latency_target_s) + RESULT_GRACE_S
            try:
                outcome.result = future.result(wait_s)
            except concurrent.futures.TimeoutError:
                raise ServerError(f"model '{name}': no answer {wait_s:.0f} s after the deadline") from None
        return {"scores": outcome.result.scores}

    def place_outputs(self, request: InferRequest, outputs: dict[str, np.ndarray]) -> dict[str, TensorRef]:
        """Write the outputs the request asked for in shared memory; their places, as the response describes them."""
        return {name: self.shared_memory.write_output(ref, outputs[name], f"output '{name}'")
                for name, ref in request.output_regions.items()}

    @contextlib.contextmanager
    def _accounted(self, name: str, protocol: str) -> Iterator[_Outcome]:
        """Statistics and metrics of one request, whichever way it ends."""
        started = time.perf_counter()
        label = name if name in self.models else "_unknown"
        outcome = _Outcome()
        try:
            yield outcome
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            self.metrics.request(label, protocol, "cancelled")
            raise
        except Exception as error:
            self._record_failure(label, time.perf_counter() - started)
            outcome_label = status_of(error)[2]
            self.metrics.request(label, protocol, outcome_label)
            if label in self.windows and outcome_label == "overloaded":
                self.windows[label].refused()
            raise
        assert outcome.result is not None
        if name in self.windows:
            self.windows[name].answered(time.perf_counter() - started)
        self._record_success(name, outcome.result)
        self.metrics.observe(name, outcome.result)
        self.metrics.request(name, protocol, "ok")

    def _record_success(self, name: str, result: QueryResult) -> None:
        with self._lock:
            s = self.statistics[name]
            s.inference_count += result.scores.shape[0]
            s.execution_count += result.sub_batches
            s.last_inference_ms = int(time.time() * 1e3)
            for pair, seconds in ((s.success, result.total_s), (s.queue, result.queue_s),
                                  (s.compute, result.compute_s)):
                pair[0] += 1
                pair[1] += int(seconds * 1e9)

    def _record_failure(self, name: str, seconds: float) -> None:
        with self._lock:
            if name in self.statistics:
                self.statistics[name].fail[0] += 1
                self.statistics[name].fail[1] += int(seconds * 1e9)

    # --- control (the tuner's API) ---

    def scheduler_state(self, name: str) -> dict[str, object]:
        model = self.model(name)
        knobs = model.executor.knobs
        outstanding, pending_items = model.executor.queue_state()
        return {
            "batch_size": knobs.batch_size, "num_workers": knobs.num_workers,
            "threads_per_worker": knobs.threads_per_worker, "accelerator_threshold": knobs.accelerator_threshold,
            "max_queue": knobs.max_queue, "latency_target_ms": model.executor.latency_target_s * 1e3,
            "accelerator_available": model.executor.accelerator_available,
            "queries_outstanding": outstanding, "items_waiting": pending_items,
            "online_tuning": self.tuners[name].state_dict() if name in self.tuners else None,
        }

    def tuning_lock(self, name: str) -> threading.Lock:
        """Held while the online tuner decides and applies, so a hand-set knob and a tuner's never interleave."""
        return self._tuning_locks[name]

    def set_scheduler(self, name: str, changes: dict[str, object]) -> dict[str, object]:
        """Apply knob changes (blocking: new workers start before this returns)."""
        model = self.model(name)
        changes = dict(changes)
        target_ms = changes.pop("latency_target_ms", None)
        allowed = {"batch_size", "num_workers", "threads_per_worker", "accelerator_threshold", "max_queue"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise InvalidInputError(f"unknown scheduler settings {unknown} (known: {sorted(allowed)}, "
                                    "latency_target_ms)")
        for key, value in changes.items():
            if not (value is None and key == "accelerator_threshold") and (
                not isinstance(value, int) or isinstance(value, bool)
            ):
                raise InvalidInputError(f"scheduler setting '{key}' must be an integer, got {value!r}")
        if target_ms is not None and (not isinstance(target_ms, int | float) or isinstance(target_ms, bool)):
            raise InvalidInputError(f"latency_target_ms must be a number, got {target_ms!r}")
        with self._tuning_locks.get(name) or contextlib.nullcontext():
            model.executor.set_knobs(latency_target_s=None if target_ms is None else target_ms / 1e3, **changes)
            if name in self.tuners:  # a hand-set knob: the online tuner starts over from it
                self.tuners[name].target_ms = model.executor.latency_target_s * 1e3
                self.tuners[name].reset(model.executor.setting)
        return self.scheduler_state(name)


def raise_unless_recserve(error: BaseException) -> None:
    """Front ends answer RecserveErrors with their status; anything else is logged as the bug it is."""
    if not isinstance(error, RecserveError):
        log.error("unexpected error while serving a request", exc_info=error)
