"""KServe v2 / Triton HTTP inference bodies: JSON tensors and the binary tensor extension, both ways.

A request body is a JSON header, optionally followed by raw tensor bytes (the binary extension); the HTTP header
`Inference-Header-Content-Length` then says where the JSON ends. Every tensor declares `name`, `shape`,
`datatype`, and either JSON `data` (flat or nested, row-major) or `parameters.binary_data_size`, its share of the
binary tail, in order, or `parameters.shared_memory_*`, its place in a region the client registered (the system
shared-memory extension, `shared_memory.py`). Decoding checks all of it and names the offending input; nothing is
evaluated or unpickled. Pure functions but for the regions' reads: the HTTP front end calls them, the tests drive
them with tritonclient's own encoder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recserve.errors import InvalidInputError
from recserve.serve.shared_memory import NO_SHARED_MEMORY, SharedInput, SharedMemoryRegistry, TensorRef

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}
DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
MAX_DIMS = 8


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str
    inputs: dict[str, np.ndarray]  # name -> tensor of its declared shape and datatype
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output -> wants binary data
    parameters: dict[str, Any] = field(default_factory=dict)
    output_regions: dict[str, TensorRef] = field(default_factory=dict)  # outputs to write into shared memory


def decode_request(body: bytes, header_length: int | None = None,
                   shared_memory: SharedMemoryRegistry = NO_SHARED_MEMORY) -> InferRequest:
    """Parse a v2 inference request body; `header_length` is Inference-Header-Content-Length, if sent;
    `shared_memory`: the regions its tensors may name."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length is {header_length}, but the body has {len(body)} bytes"
        )
    header = parse_json_object(body[:header_length], "request header")
    binary = memoryview(body)[header_length:]
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("request must have a non-empty list 'inputs'")
    inputs: dict[str, np.ndarray] = {}
    shared: list[SharedInput] = []
    seen: set[str] = set()
    offset = 0
    for position, raw in enumerate(raw_inputs):
        name, tensor, used = _decode_input(raw, position, binary, offset)
        if name in seen:
            raise InvalidInputError(f"input '{name}' appears twice")
        seen.add(name)
        if isinstance(tensor, np.ndarray):
            inputs[name] = tensor
        else:
            shared.append((name, *tensor))
        offset += used
    if offset != len(binary):
        raise InvalidInputError(
            f"the binary section has {len(binary)} bytes, but the inputs declare {offset} (truncated or extra data)"
        )
    outputs, output_regions = _requested_outputs(header.get("outputs", []))
    for name, ref in output_regions.items():
        shared_memory.check_output(ref, f"output '{name}'")
    if shared:
        inputs |= shared_memory.read_inputs(shared)
    return InferRequest(
        id=_string(header.get("id", ""), "id"),
        inputs=inputs,
        outputs=outputs,
        parameters=_mapping(header.get("parameters", {}), "parameters"),
        output_regions=output_regions,
    )


def parse_json_object(raw: bytes | memoryview, what: str) -> dict:
    try:
        parsed = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InvalidInputError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def timeout_parameter(parameters: dict[str, Any]) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton's clients send it) in seconds, if any."""
    if "timeout" not in parameters:
        return None
    value = parameters["timeout"]
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"parameter 'timeout' must be a positive number of microseconds, got {value!r}")
    return value / 1e6


def _decode_input(raw: object, position: int, binary: memoryview,
                  offset: int) -> tuple[str, np.ndarray | tuple[TensorRef, np.dtype, list[int]], int]:
    """(name, the tensor or where it lies in shared memory, bytes of the binary section it used)"""
    if not isinstance(raw, dict):
        raise InvalidInputError(f"inputs[{position}] must be an object")
    name = _string(raw.get("name"), f"inputs[{position}].name")
    where = f"input '{name}'"
    shape = check_shape(raw.get("shape"), where)
    datatype = raw.get("datatype")
    dtype = check_datatype(datatype, where)
    count = math.prod(shape)
    parameters = _mapping(raw.get("parameters", {}), f"{where}.parameters")
    ref = TensorRef.from_parameters(parameters, where)
    if ref is not None:
        if "data" in raw or "binary_data_size" in parameters:
            raise InvalidInputError(f"{where}: lies in shared memory, so it carries no data or binary_data_size")
        return name, (ref, dtype, shape), 0
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInputError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if size != count * dtype.itemsize:
            raise InvalidInputError(
                f"{where}: binary_data_size is {size} bytes, but shape {shape} of {datatype} needs "
                f"{count * dtype.itemsize}"
            )
        if offset + size > len(binary):
            raise InvalidInputError(
                f"{where}: needs {size} bytes of binary data at offset {offset}, the body has {len(binary) - offset}"
            )
        tensor = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
        return name, tensor, size
    if "data" not in raw:
        raise InvalidInputError(f"{where}: has neither 'data' nor parameters.binary_data_size")
    return name, _json_tensor(raw["data"], shape, datatype, where), 0


def _json_tensor(data: object, shape: list[int], datatype: str, where: str) -> np.ndarray:
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInputError(f"{where}: data is ragged; give it flat or as a full nested list") from None
    if values.dtype == object or values.dtype.kind in "US":
        raise InvalidInputError(f"{where}: data must be numbers{' or booleans' if datatype == 'BOOL' else ''}")
    expected_kind = {"BOOL": "b", "FP16": "f", "FP32": "f", "FP64": "f"}.get(datatype, "iu")
    accepted = expected_kind + ("iu" if expected_kind == "f" else "")  # 3 is a fine FP32 value
    if values.size and values.dtype.kind not in accepted:
        raise InvalidInputError(f"{where}: {datatype} data must be {_kind_word(expected_kind)}, got {values.dtype}")
    if values.size != math.prod(shape):
        raise InvalidInputError(f"{where}: shape {shape} needs {math.prod(shape)} values, data has {values.size}")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInputError(f"{where}: values outside the range of {datatype}")
    return values.astype(dtype).reshape(shape)


def _kind_word(kind: str) -> str:
    return {"b": "booleans", "f": "numbers", "iu": "integers"}[kind]


def check_datatype(datatype: object, where: str) -> np.dtype:
    if datatype not in DATATYPES:
        raise InvalidInputError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    return DATATYPES[datatype]  # type: ignore[index]


def check_shape(raw: object, where: str) -> list[int]:
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw)
    ):
        raise InvalidInputError(f"{where}: shape must be a list of at most {MAX_DIMS} sizes >= 0, got {raw!r}")
    return raw


def _string(raw: object, where: str) -> str:
    if not isinstance(raw, str):
        raise InvalidInputError(f"{where} must be a string, got {raw!r}")
    return raw


def _mapping(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where} must be an object, got {type(raw).__name__}")
    return raw


def _requested_outputs(raw: object) -> tuple[dict[str, bool], dict[str, TensorRef]]:
    """Each requested output: whether it wants binary data; and the ones to write into shared memory."""
    if not isinstance(raw, list):
        raise InvalidInputError("'outputs' must be a list")
    requested, regions = {}, {}
    for position, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidInputError(f"outputs[{position}] must be an object")
        name = _string(item.get("name"), f"outputs[{position}].name")
        parameters = _mapping(item.get("parameters", {}), f"output '{name}'.parameters")
        requested[name] = bool(parameters.get("binary_data", False))
        ref = TensorRef.from_parameters(parameters, f"output '{name}'")
        if ref is not None:
            regions[name] = ref
    return requested, regions


def encode_response(
    model_name: str, model_version: str, request_id: str, outputs: dict[str, np.ndarray],
    binary: dict[str, bool] | None = None, placed: dict[str, TensorRef] | None = None,
) -> tuple[bytes, int | None]:
    """A v2 response body and, when any output travels as binary, the length of its JSON header. `placed`: the
    outputs already written into shared memory, described by their place instead of their data."""
    binary, placed = binary or {}, placed or {}
    described, tails = [], []
    for name, tensor in outputs.items():
        datatype = DATATYPE_OF.get(tensor.dtype)
        if datatype is None:
            raise TypeError(f"output '{name}': no v2 datatype for {tensor.dtype}")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
        if name in placed:
            entry["parameters"] = placed[name].parameters()
        elif binary.get(name):
            raw = np.ascontiguousarray(tensor).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = tensor.reshape(-1).tolist()
        described.append(entry)
    header = json.dumps(
        {"model_name": model_name, "model_version": model_version, "id": request_id, "outputs": described},
        separators=(",", ":"),
    ).encode()
    if not tails:
        return header, None
    return header + b"".join(tails), len(header)
