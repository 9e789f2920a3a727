"""The KServe v2 gRPC front end: `inference.GRPCInferenceService` on grpcio's thread-pool server.

The thread-pool server, not grpc.aio: a 1.4 MB request took 4.6 ms to arrive through grpc.aio and 1.6 ms through
the thread-pool server on the same machine (a handler thread only waits on the query's Future meanwhile).

The messages come from our own kserve_v2.proto, compiled when this module loads (grpc.protos; no generated
code in the tree). The service is registered by its spec name with generic handlers, so Triton's and KServe's
clients call it unchanged. Errors abort the call with the code `engine.status_of` gives, and a message naming
what was wrong; a malformed message never reaches our code (grpc refuses it while decoding).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from recserve.errors import InvalidInputError, RecserveError
from recserve.serve.codec import DATATYPE_OF, InferRequest, check_datatype, check_shape, timeout_parameter
from recserve.serve.engine import MODEL_VERSION, InferenceServer, raise_unless_recserve, status_of
from recserve.serve.protocol import model_config_json, model_metadata_json, server_metadata, statistics_json
from recserve.serve.shared_memory import NO_SHARED_MEMORY, SharedInput, SharedMemoryRegistry, TensorRef

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
NO_DEADLINE_S = 1e6
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # grpc.protos resolves the path from sys.path
if _PACKAGE_ROOT not in sys.path:
    sys.path.append(_PACKAGE_ROOT)
pb = grpc.protos("recserve/serve/kserve_v2.proto")

# typed `contents` field of each datatype, for requests that send values instead of raw bytes
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def decode_infer_request(message: Any, shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY) -> InferRequest:
    """A ModelInferRequest as the engine's InferRequest, every tensor checked against its declaration; inputs in
    shared memory read from the regions they name (which have no entry in raw_input_contents)."""
    raw = message.raw_input_contents
    places = [TensorRef.from_parameters(_parameters(t.parameters), f"input '{t.name}'") for t in message.inputs]
    num_carried = places.count(None)
    if raw and len(raw) != num_carried:
        raise InvalidInputError(f"raw_input_contents has {len(raw)} entries for {num_carried} inputs "
                                "not in shared memory")
    if not message.inputs:
        raise InvalidInputError("request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    shared: list[SharedInput] = []
    seen: set[str] = set()
    carried = iter(raw)
    for tensor, place in zip(message.inputs, places, strict=True):
        where = f"input '{tensor.name}'"
        if tensor.name in seen:
            raise InvalidInputError(f"{where} appears twice")
        seen.add(tensor.name)
        shape = check_shape(list(tensor.shape), where)
        dtype = check_datatype(tensor.datatype, where)
        count = math.prod(shape)
        if place is not None:
            if tensor.HasField("contents"):
                raise InvalidInputError(f"{where}: lies in shared memory, so it carries no contents")
            shared.append((tensor.name, place, dtype, shape))
            continue
        if raw:
            data = next(carried)
            if len(data) != count * dtype.itemsize:
                raise InvalidInputError(f"{where}: raw content has {len(data)} bytes, shape {shape} of "
                                        f"{tensor.datatype} needs {count * dtype.itemsize}")
            inputs[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise InvalidInputError(f"{where}: {tensor.datatype} must be sent in raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidInputError(f"{where}: shape {shape} needs {count} values, contents has {len(values)}")
        try:
            inputs[tensor.name] = np.array(values, dtype=dtype).reshape(shape)
        except OverflowError:
            raise InvalidInputError(f"{where}: values outside the range of {tensor.datatype}") from None
    output_regions = _output_regions(message.outputs, shared_memory)
    if shared:
        inputs |= shared_memory.read_inputs(shared)
    return InferRequest(
        id=message.id, inputs=inputs, outputs={o.name: True for o in message.outputs},
        parameters=_parameters(message.parameters), output_regions=output_regions,
    )


def _output_regions(outputs: Any, shared_memory: SharedMemoryRegistry) -> dict[str, TensorRef]:
    """The requested outputs to write into shared memory, each place checked before the query runs."""
    regions = {}
    for output in outputs:
        where = f"output '{output.name}'"
        place = TensorRef.from_parameters(_parameters(output.parameters), where)
        if place is not None:
            shared_memory.check_output(place, where)
            regions[output.name] = place
    return regions


def _parameters(parameters: Any) -> dict[str, object]:
    """A map of InferParameter (or ModelRepositoryParameter) as plain values."""
    return {key: _parameter_value(value) for key, value in parameters.items()}


def _parameter_value(parameter: Any) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def encode_infer_response(name: str, request_id: str, outputs: dict[str, np.ndarray],
                          placed: dict[str, TensorRef] | None = None) -> Any:
    """`placed`: the outputs already written into shared memory; they get their place and no raw contents."""
    placed = placed or {}
    response = pb.ModelInferResponse(model_name=name, model_version=MODEL_VERSION, id=request_id)
    for output_name, tensor in outputs.items():
        output = response.outputs.add(name=output_name, datatype=DATATYPE_OF[tensor.dtype], shape=list(tensor.shape))
        if output_name in placed:
            for key, value in placed[output_name].parameters().items():
                setattr(output.parameters[key], "string_param" if isinstance(value, str) else "int64_param", value)
        else:
            response.raw_output_contents.append(np.ascontiguousarray(tensor).tobytes())
    return response


Rpc = Callable[[Any, grpc.ServicerContext], Any]


@dataclass(frozen=True, slots=True)
class _Undecodable:
    error: str


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    """Decode a request, or keep the error for the handler: grpc.aio would answer UNKNOWN and log a traceback."""

    def decode(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as error:
            return _Undecodable(f"request is not a valid {message_type.DESCRIPTOR.name}: {error}")

    return decode


def _mapped_errors(rpc: Rpc) -> Rpc:
    """Abort with the status of a RecserveError (or INTERNAL for a bug); the server itself carries on."""

    @functools.wraps(rpc)
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise InvalidInputError(request.error)
            return rpc(request, context)
        except Exception as error:
            raise_unless_recserve(error)
            code = status_of(error)[1]
            message = str(error) if isinstance(error, RecserveError) else f"internal error: {type(error).__name__}"
        context.abort(code, message)

    return call


class InferenceService:
    def __init__(self, server: InferenceServer) -> None:
        self.server = server

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.server.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name, request.version))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return json_format.ParseDict(server_metadata(self.server.extensions), pb.ServerMetadataResponse())

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.server.model(request.name, request.version)
        return json_format.ParseDict(model_metadata_json(model), pb.ModelMetadataResponse())

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.server.model(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(model_config_json(model), pb.ModelConfig()))

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        names = [self.server.model(request.name, request.version).name] if request.name else sorted(
            self.server.models)
        stats = [statistics_json(n, self.server.statistics[n]) for n in names]
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        return json_format.ParseDict({"models": self.server.repository_index(ready_only=request.ready)},
                                     pb.RepositoryIndexResponse())

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.server.load_model(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.server.unload_model(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    def SystemSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        regions = {region["name"]: region for region in self.server.shared_memory.status(request.name)}
        return json_format.ParseDict({"regions": regions}, pb.SystemSharedMemoryStatusResponse())

    def SystemSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.server.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.server.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        infer_request = decode_infer_request(request, self.server.shared_memory)
        timeout_s = timeout_parameter(infer_request.parameters)
        remaining = context.time_remaining()  # the client's deadline; "forever" (~1e8 s) when it set none
        if remaining is not None and remaining < NO_DEADLINE_S:
            timeout_s = remaining if timeout_s is None else min(timeout_s, remaining)
        outputs = self.server.infer_blocking(request.model_name, request.model_version, infer_request, timeout_s,
                                             "grpc", context.add_callback)
        placed = self.server.place_outputs(infer_request, outputs)
        return encode_infer_response(request.model_name, request.id, outputs, placed)

    def handler(self) -> grpc.GenericRpcHandler:
        requests = {
            "ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest,
            "ModelReady": pb.ModelReadyRequest, "ServerMetadata": pb.ServerMetadataRequest,
            "ModelMetadata": pb.ModelMetadataRequest, "ModelConfig": pb.ModelConfigRequest,
            "ModelStatistics": pb.ModelStatisticsRequest, "RepositoryIndex": pb.RepositoryIndexRequest,
            "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
            "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
            "ModelInfer": pb.ModelInferRequest,
            "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusRequest,
            "SystemSharedMemoryRegister": pb.SystemSharedMemoryRegisterRequest,
            "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterRequest,
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            method: grpc.unary_unary_rpc_method_handler(
                _mapped_errors(getattr(self, method)), request_deserializer=_lenient(message),
                response_serializer=lambda response: response.SerializeToString(),
            )
            for method, message in requests.items()
        })


def build_server(server: InferenceServer, max_message_bytes: int, threads: int = 64,
                 max_concurrent_rpcs: int = 4096) -> grpc.Server:
    """Requests beyond `max_concurrent_rpcs` in progress get RESOURCE_EXHAUSTED from grpc at once."""
    grpc_server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    grpc_server.add_generic_rpc_handlers((InferenceService(server).handler(),))
    return grpc_server
