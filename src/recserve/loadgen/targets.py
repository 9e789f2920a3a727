"""Where the load goes: a running `recserve serve` (Triton's own async clients, gRPC or HTTP) or an executor in
this process (quick runs, tests, the simulator's profiles). Each turns a refusal into OverloadedError."""

from __future__ import annotations

import asyncio
from types import ModuleType

import numpy as np

from recserve.errors import OverloadedError
from recserve.loadgen.workload import Query, as_v2_arrays
from recserve.models.specs import ModelSpec
from recserve.sched.executor import Executor, QueryResult
from recserve.serve.codec import DATATYPE_OF

# the server refused (overload); UNAVAILABLE is not here: over gRPC it also means "could not connect"
REFUSED = {"503", "StatusCode.RESOURCE_EXHAUSTED"}


def triton_inputs(module: ModuleType, arrays: dict[str, np.ndarray], binary: bool = True) -> list:
    """tritonclient InferInputs for named arrays, `module` being tritonclient.grpc or .http (or their .aio);
    over HTTP, `binary` sends them with the binary tensor extension instead of as JSON."""
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), DATATYPE_OF[array.dtype])
        if module.__name__.startswith("tritonclient.http"):
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class ClientRegion:
    """A client's region of system shared memory, registered with a server (`--allow-client-shm`): the query's
    tensors are written into it and the request only names where they lie (serve/shared_memory.py).

    `client` is a synchronous tritonclient client (gRPC or HTTP) of the server, `module` its module (for the
    InferInputs). The region is a POSIX shared-memory object made with the standard library, as tritonclient's
    own helper does in its later releases (the release this project resolves needs pkg_resources for it, which
    setuptools no longer ships). One query in flight per region: the next one's inputs overwrite this one's."""

    def __init__(self, client: object, module: ModuleType, name: str, byte_size: int) -> None:
        from multiprocessing import shared_memory

        self._client, self._module = client, module
        self.name, self.byte_size = name, byte_size
        self._memory = shared_memory.SharedMemory(name, create=True, size=byte_size)
        self.key = f"/{self._memory.name.lstrip('/')}"
        try:
            client.register_system_shared_memory(name, self.key, byte_size)  # type: ignore[attr-defined]
        except BaseException:
            self._release()
            raise

    def inputs(self, arrays: dict[str, np.ndarray]) -> list:
        """InferInputs for named arrays, the arrays written one after another from the region's start."""
        inputs, offset = [], 0
        for name, array in arrays.items():
            tensor = self._module.InferInput(name, list(array.shape), DATATYPE_OF[array.dtype])
            tensor.set_shared_memory(self.name, array.nbytes, offset)
            inputs.append(tensor)
            offset += array.nbytes
        self.write_all(arrays)
        return inputs

    def write_all(self, arrays: dict[str, np.ndarray]) -> None:
        """The arrays one after another from the region's start, where `inputs` of the same arrays says they lie."""
        offset = 0
        for array in arrays.values():
            self.write(array, offset)
            offset += array.nbytes

    def output(self, name: str, byte_size: int, offset: int = 0) -> object:
        """A requested output the server is to write into this region, at offset."""
        requested = self._module.InferRequestedOutput(name)
        requested.set_shared_memory(self.name, byte_size, offset)
        return requested

    def write(self, array: np.ndarray, offset: int = 0) -> None:
        if offset + array.nbytes > self.byte_size:
            raise ValueError(f"region '{self.name}' has {self.byte_size} bytes, {array.nbytes} at {offset} overrun it")
        view = np.ndarray(array.shape, array.dtype, buffer=self._memory.buf, offset=offset)
        view[...] = array

    def read(self, dtype: np.dtype, shape: list[int], offset: int = 0) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self._memory.buf, offset=offset).copy()

    def close(self) -> None:
        try:
            self._client.unregister_system_shared_memory(self.name)  # type: ignore[attr-defined]
        finally:
            self._release()

    def _release(self) -> None:
        self._memory.close()
        self._memory.unlink()


class InProcessTarget:
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        await asyncio.wrap_future(self.executor.submit(query.dense, query.sparse, timeout_s))

    async def close(self) -> None:
        pass


class RecordingTarget(InProcessTarget):
    """An executor in this process that keeps every answer (the executor's timings) and when it came back, so a
    run can be compared with a simulation of itself (`sim.observed_profile`)."""

    def __init__(self, executor: Executor) -> None:
        super().__init__(executor)
        self.answers: list[tuple[float, QueryResult]] = []  # (loop time at the answer, result)

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        result = await asyncio.wrap_future(self.executor.submit(query.dense, query.sparse, timeout_s))
        self.answers.append((asyncio.get_running_loop().time(), result))


class TritonTarget:
    """A model on a KServe v2 server, through tritonclient's asyncio client (`protocol` grpc or http)."""

    def __init__(self, address: str, model: str, spec: ModelSpec, protocol: str = "grpc") -> None:
        if protocol == "grpc":
            import tritonclient.grpc.aio as client_module
        else:
            import tritonclient.http.aio as client_module
        self._module = client_module
        self._client = client_module.InferenceServerClient(address)
        self._model, self._spec, self._protocol = model, spec, protocol

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        from tritonclient.utils import InferenceServerException

        inputs = triton_inputs(self._module, as_v2_arrays(self._spec, query))
        timeout_us = None if timeout_s is None else max(1, int(timeout_s * 1e6))
        try:
            await self._client.infer(self._model, inputs, timeout=timeout_us)
        except InferenceServerException as error:
            if str(error.status()) in REFUSED:
                raise OverloadedError(error.message() or "refused") from None
            raise

    async def close(self) -> None:
        await self._client.close()
