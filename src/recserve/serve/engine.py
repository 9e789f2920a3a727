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
                 shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY, model_control: bool = False) -> None:
        self.repo = repo
        self.shared_memory = shared_memory  # the regions clients registered, if the server lets them
        self.model_control = model_control  # clients may load, reload and unload models (Triton's explicit mode)
        self.models: dict[str, ServedModel] = {}
        self.statistics: dict[str, ModelStatistics] = {}
        self.online_tuning = online_tuning  # re-tune every model online, whatever its serve.yaml says
        self.windows: dict[str, WindowRecorder] = {}  # live traffic of the models tuned online
        self.tuners: dict[str, OnlineTuner] = {}
        self._tuning_locks: dict[str, threading.Lock] = {}
        self.ready = False
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: dict(self.models))
        self.on_load: list[Callable[[str], object]] = []  # called with a model's name once it serves
        self._lock = threading.Lock()
        self._in_use: dict[int, int] = {}  # id(model) -> requests using it, so that a retired model closes after them
        self._released = threading.Condition(self._lock)
        self._control_lock = threading.Lock()  # one load or unload at a time

    # --- lifetime ---

    def load(self) -> None:
        """Load every model of the repository (blocking); ready once all are in."""
        for folder in model_folders(self.repo):
            self._install(self._loaded(folder))
        self.ready = True

    def _loaded(self, folder: Path, alternate_store: bool = False) -> ServedModel:
        started = time.perf_counter()
        model = load_model(folder, alternate_store)
        log.info("model %s loaded in %.1f s", model.name, time.perf_counter() - started)
        return model

    def _install(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` from now on; the model it replaces, if any."""
        name = model.name
        with self._lock:
            replaced = self.models.get(name)
            self.models[name] = model
            self.statistics.setdefault(name, ModelStatistics())
            if self.online_tuning or model.config.online_tuning.enabled:
                self.windows[name] = WindowRecorder(model.config.online_tuning.percentile)
                self.tuners[name] = tuner_for(model)
                self._tuning_locks.setdefault(name, threading.Lock())
            else:
                self.windows.pop(name, None)
                self.tuners.pop(name, None)
        for hook in self.on_load:
            hook(name)
        return replaced

    def close(self) -> None:
        self.ready = False
        self.shared_memory.close()
        for model in self.models.values():
            model.close()

    # --- model control (Triton's model repository extension, explicit mode) ---

    def load_model(self, name: str, parameters: dict[str, object] | None = None) -> None:
        """Load a model of the repository, or reload it from its folder (a new checkpoint): the old copy serves
        until the new one is ready, then closes once the requests it holds are answered. Blocks for seconds."""
        self._check_control(parameters or {}, allowed=())
        folder = self._folder(name)
        with self._control_lock:
            serving = self.models.get(name)  # a reload: the new copy imports into the other store directory
            try:
                model = self._loaded(folder, alternate_store=serving is not None and not serving.alternate_store)
            except RecserveError:
                raise
            except Exception as error:  # the server carries on with what it serves; the caller learns why
                log.exception("model %s failed to load", name)
                raise RecserveError(f"model '{name}' failed to load: {type(error).__name__}: {error}") from None
            replaced = self._install(model)
            if replaced is not None:
                self._retire(replaced)

    def unload_model(self, name: str, parameters: dict[str, object] | None = None) -> None:
        """Stop serving a model: new requests for it get 404 at once, those in flight are answered first.
        `unload_dependents` is accepted and has nothing to act on (recserve has no ensembles)."""
        self._check_control(parameters or {}, allowed=("unload_dependents",))
        with self._control_lock:
            with self._lock:
                model = self.models.pop(name, None)
                self.windows.pop(name, None)
                self.tuners.pop(name, None)
            if model is None:
                raise NotFoundError(f"model '{name}' is not loaded")
            self._retire(model)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model of the repository and every model served: its state and, when not ready, why."""
        try:
            on_disk = {folder.name for folder in model_folders(self.repo)}
        except NotFoundError:  # the folder was emptied or removed while serving
            on_disk = set()
        index = []
        for name in sorted(on_disk | set(self.models)):
            if name not in self.models:
                state, reason = "UNAVAILABLE", "unloaded"
            elif self.model_ready(name):
                state, reason = "READY", ""
            else:
                state, reason = "UNAVAILABLE", "no live workers"
            if state == "READY" or not ready_only:
                index.append({"name": name, "version": MODEL_VERSION, "state": state, "reason": reason})
        return index

    def _check_control(self, parameters: dict[str, object], allowed: tuple[str, ...]) -> None:
        if not self.model_control:
            raise InvalidInputError("model control is off on this server (start it with --model-control to load, "
                                    "reload and unload models)")
        unknown = sorted(set(parameters) - set(allowed))
        if unknown:
            raise InvalidInputError(f"parameters {unknown} are not supported: a model loads from its folder as it "
                                    "is (write its serve.yaml or checkpoint there, then load it)")

    def _folder(self, name: str) -> Path:
        folders = {folder.name: folder for folder in model_folders(self.repo)}
        if name not in folders:  # only a folder of the repository: no path from the request reaches the disk
            raise NotFoundError(f"no model '{name}' in repository {self.repo} (it has: {', '.join(sorted(folders))})")
        return folders[name]

    def _retire(self, model: ServedModel) -> None:
        """Close a model no new request can reach, once the requests already using it are done (or their
        deadline and the grace after it have passed: a stuck one fails with the model's shutdown)."""
        deadline = time.monotonic() + model.executor.latency_target_s + RESULT_GRACE_S
        with self._released:
            while self._in_use.get(id(model)) and (left := deadline - time.monotonic()) > 0:
                self._released.wait(left)
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

    @contextlib.contextmanager
    def _using(self, name: str, version: str) -> Iterator[ServedModel]:
        """The model a request is for, counted as in use until the request is done (see `_retire`)."""
        with self._lock:
            model = self.model(name, version)
            self._in_use[id(model)] = self._in_use.get(id(model), 0) + 1
        try:
            yield model
        finally:
            with self._lock:
                left = self._in_use.pop(id(model)) - 1
                if left:
                    self._in_use[id(model)] = left
                else:
                    self._released.notify_all()

    @staticmethod
    def _decode(model: ServedModel, request: InferRequest) -> tuple[np.ndarray | None, SparseBatch]:
        unknown = [o for o in request.outputs if o not in {t.name for t in model.signature.outputs}]
        if unknown:
            raise InvalidInputError(f"model '{model.name}' has no outputs {unknown} (it has: scores)")
        return model.signature.decode(request.inputs)

    async def infer(self, name: str, version: str, request: InferRequest, timeout_s: float | None,
                    protocol: str) -> dict[str, np.ndarray]:
        """Scores of one request, for a front end on the event loop; raises a RecserveError on anything wrong.
        A query the inline replica would take goes to a thread that runs it there (the loop must not block)."""
        with self._accounted(name, protocol) as outcome, self._using(name, version) as model:
            dense, sparse = self._decode(model, request)
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
        with self._accounted(name, protocol) as outcome, self._using(name, version) as model:
            dense, sparse = self._decode(model, request)
            # this thread would only wait: an idle worker runs the query straight from it
            future = model.executor.submit(dense, sparse, timeout_s, run_here=True)
            on_abandon(future.cancel)
            wait_s = (timeout_s or model.executor.latency_target_s) + RESULT_GRACE_S
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
            if outcome_label == "overloaded" and (window := self.windows.get(label)) is not None:
                window.refused()
            raise
        assert outcome.result is not None
        if (window := self.windows.get(name)) is not None:
            window.answered(time.perf_counter() - started)
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
