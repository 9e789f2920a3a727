"""Where the load goes: a running `recserve serve` (Triton's own async clients, gRPC or HTTP) or an executor in
this process (quick runs, tests, the simulator's profiles). Each turns a refusal into OverloadedError."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
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

    `client` is a synchronous tritonclient client (gRPC or HTTP) of the server, which registers the region now
    and unregisters it on `close`; None for an asyncio client, whose caller registers it (`TritonTarget`).
    `module` is the client's module (for the InferInputs). The region is a POSIX shared-memory object made with
    the standard library, as tritonclient's own helper does in its later releases (the release this project
    resolves needs pkg_resources for it, which setuptools no longer ships). One query in flight per region: the
    next one's inputs overwrite this one's."""

    def __init__(self, client: object | None, module: ModuleType, name: str, byte_size: int) -> None:
        from multiprocessing import shared_memory

        self._client, self._module = client, module
        self.name, self.byte_size = name, byte_size
        self._memory = shared_memory.SharedMemory(name, create=True, size=byte_size)
        self.key = f"/{self._memory.name.lstrip('/')}"
        if client is not None:
            try:
                client.register_system_shared_memory(name, self.key, byte_size)  # type: ignore[attr-defined]
            except BaseException:
                self.unlink()
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
        """Unregister the region (where this object registered it) and remove it."""
        try:
            if self._client is not None:
                self._client.unregister_system_shared_memory(self.name)  # type: ignore[attr-defined]
        finally:
            self.unlink()

    def unlink(self) -> None:
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
    """A model on a KServe v2 server, through tritonclient's asyncio client (`protocol` grpc or http).

    With `shared_memory` (a server on this machine started with --allow-client-shm), each query's inputs go
    through a region of system shared memory instead of the request: a region per query in flight, kept for the
    next query once answered, so that the load generator, which shares the server's cores, spends less of them."""

    def __init__(self, address: str, model: str, spec: ModelSpec, protocol: str = "grpc",
                 shared_memory: bool = False) -> None:
        if protocol == "grpc":
            import tritonclient.grpc.aio as client_module
        else:
            import tritonclient.http.aio as client_module
        self._module = client_module
        self._client = client_module.InferenceServerClient(address)
        self._model, self._spec, self._protocol = model, spec, protocol
        self._shared_memory = shared_memory
        self._idle_regions: list[ClientRegion] = []
        self._regions: list[ClientRegion] = []  # every region registered, idle or not

    async def infer(self, query: Query, timeout_s: float | None) -> None:
        from tritonclient.utils import InferenceServerException

        arrays = as_v2_arrays(self._spec, query)
        region = await self._region(sum(array.nbytes for array in arrays.values())) if self._shared_memory else None
        inputs = triton_inputs(self._module, arrays) if region is None else region.inputs(arrays)
        timeout_us = None if timeout_s is None else max(1, int(timeout_s * 1e6))
        try:
            await self._client.infer(self._model, inputs, timeout=timeout_us)
        except InferenceServerException as error:
            if str(error.status()) in REFUSED:
                raise OverloadedError(error.message() or "refused") from None
            raise
        finally:
            if region is not None:
                self._idle_regions.append(region)

    async def _region(self, nbytes: int) -> ClientRegion:
        """An idle region that holds nbytes, or a new one in place of an idle one too small (so there are never
        more regions than queries were in flight at once); sizes in powers of two, so that few are made."""
        for position, region in enumerate(self._idle_regions):
            if region.byte_size >= nbytes:
                return self._idle_regions.pop(position)
        if self._idle_regions:
            await self._forget(self._idle_regions.pop())
        size = 1 << max(16, (nbytes - 1).bit_length())
        region = ClientRegion(None, self._module, f"loadgen-{os.getpid()}-{uuid.uuid4().hex[:12]}", size)
        try:
            await self._client.register_system_shared_memory(region.name, region.key, size)
        except BaseException:
            region.unlink()
            raise
        self._regions.append(region)
        return region

    async def _forget(self, region: ClientRegion) -> None:
        self._regions.remove(region)
        try:
            with contextlib.suppress(Exception):  # a server that is gone has no regions to forget
                await self._client.unregister_system_shared_memory(region.name)
        finally:
            region.unlink()

    async def close(self) -> None:
        try:
            for region in list(self._regions):
                await self._forget(region)
        finally:
            await self._client.close()
