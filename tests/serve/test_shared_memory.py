"""The system shared-memory extension: the registry against a plain model of its regions, the decoders, and the
served models through tritonclient with their tensors in /dev/shm (the test server runs with --allow-client-shm)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from recserve.errors import InvalidInputError, NotFoundError
from recserve.loadgen.targets import ClientRegion, TritonTarget, triton_inputs
from recserve.models.specs import model_spec
from recserve.models.synthetic import QueryGenerator
from recserve.serve import codec
from recserve.serve.grpc_server import decode_infer_request, pb
from recserve.serve.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegistry, TensorRef
from tests.conftest import reference_model, v2_inputs
from tests.serve.conftest import Server

FILE_BYTES = 64


class ShmFile:
    """A POSIX shared-memory object of the test's, removed afterwards."""

    def __init__(self, size: int = FILE_BYTES) -> None:
        self.memory = shared_memory.SharedMemory(f"recserve_test_{uuid.uuid4().hex[:12]}", create=True, size=size)
        self.key = "/" + self.memory.name.lstrip("/")
        self.path = Path("/dev/shm") / self.memory.name.lstrip("/")

    def bytes(self) -> bytes:
        return self.path.read_bytes()

    def close(self) -> None:
        self.memory.close()
        self.memory.unlink()


@contextlib.contextmanager
def two_files() -> Iterator[list[ShmFile]]:
    files = [ShmFile() for _ in range(2)]
    try:
        for i, file in enumerate(files):
            file.memory.buf[:] = bytes((i * 100 + j) % 256 for j in range(FILE_BYTES))
        yield files
    finally:
        for file in files:
            file.close()


@pytest.fixture
def shm_files() -> Iterator[list[ShmFile]]:
    with two_files() as files:
        yield files


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the registry against a plain model ---

names = st.sampled_from(["a", "b", "c"])
spans = st.tuples(st.integers(0, FILE_BYTES + 8), st.integers(0, FILE_BYTES + 8))  # (offset, byte size)
operations = st.lists(st.one_of(
    st.tuples(st.just("register"), names, st.integers(0, 1), spans),
    st.tuples(st.just("unregister"), st.sampled_from(["a", "b", "c", ""])),
    st.tuples(st.just("read"), names, spans),
    st.tuples(st.just("write"), names, st.integers(0, FILE_BYTES + 8), st.binary(max_size=24)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_regions_behave_as_a_dict_of_byte_ranges(ops: list[tuple]) -> None:
    """Every op sequence: reads return the files' bytes, writes land where a bytearray model says, errors where the
    model has no such region or the span runs past it, and status lists what the model holds."""
    with two_files() as shm_files:
        check_against_model(shm_files, ops)


def check_against_model(shm_files: list[ShmFile], ops: list[tuple]) -> None:
    registry = SharedMemoryRegistry(enabled=True, max_request_bytes=1 << 20)
    files = [bytearray(f.bytes()) for f in shm_files]
    regions: dict[str, tuple[int, int, int]] = {}  # name -> (file, offset, byte size)
    fds_before = open_fds()
    for op in ops:
        if op[0] == "register":
            _, name, file, (offset, size) = op
            if name in regions or offset + size > FILE_BYTES:
                with pytest.raises(InvalidInputError):
                    registry.register(name, shm_files[file].key, offset, size)
            else:
                registry.register(name, shm_files[file].key, offset, size)
                regions[name] = (file, offset, size)
        elif op[0] == "unregister":
            registry.unregister(op[1])
            if op[1]:
                regions.pop(op[1], None)
            else:
                regions.clear()
        elif op[0] == "read":
            _, name, (offset, size) = op
            ref = TensorRef(name, offset, size)
            if name not in regions:
                with pytest.raises(NotFoundError, match=f"no shared memory region '{name}'"):
                    registry.read_inputs([("x", ref, np.dtype(np.uint8), [size])])
            elif offset + size > regions[name][2]:
                with pytest.raises(InvalidInputError, match="run past region"):
                    registry.read_inputs([("x", ref, np.dtype(np.uint8), [size])])
            else:
                file, start, _ = regions[name]
                got = registry.read_inputs([("x", ref, np.dtype(np.uint8), [size])])["x"]
                assert got.tobytes() == bytes(files[file][start + offset : start + offset + size])
        else:
            _, name, offset, data = op
            ref = TensorRef(name, offset, len(data))
            tensor = np.frombuffer(data, dtype=np.uint8)
            if name not in regions:
                with pytest.raises(NotFoundError):
                    registry.write_output(ref, tensor, "output 'x'")
            elif offset + len(data) > regions[name][2]:
                with pytest.raises(InvalidInputError, match="run past region"):
                    registry.write_output(ref, tensor, "output 'x'")
            else:
                file, start, _ = regions[name]
                assert registry.write_output(ref, tensor, "output 'x'") == ref
                files[file][start + offset : start + offset + len(data)] = data
        assert {s["name"]: (s["key"], s["offset"], s["byte_size"]) for s in registry.status()} == {
            name: (shm_files[file].key, offset, size) for name, (file, offset, size) in regions.items()}
    assert [bytearray(f.bytes()) for f in shm_files] == files
    registry.close()
    assert open_fds() == fds_before  # every region's descriptor closed with it


def test_a_region_refuses_what_it_cannot_be(shm_files: list[ShmFile], tmp_path: Path) -> None:
    registry = SharedMemoryRegistry(enabled=True, max_request_bytes=100)
    key = shm_files[0].key
    with pytest.raises(NotFoundError, match="no shared memory object with key '/recserve_test_absent'"):
        registry.register("r", "/recserve_test_absent", 0, 8)
    for bad in ("", "/", "/a/b", "../etc/passwd", "/..", 7):
        with pytest.raises(InvalidInputError, match="key must be"):
            registry.register("r", bad, 0, 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="one of the server's own files"):
        registry.register("r", "/recserve-1234-mailbox-abcd", 0, 8)
    with pytest.raises(InvalidInputError, match=f"offset \\+ byte_size is 72 bytes, but the object with key '{key}' "
                                                "has 64"):
        registry.register("r", key, 8, 64)
    with pytest.raises(InvalidInputError, match="offset must be an integer >= 0, got -1"):
        registry.register("r", key, -1, 8)
    link = Path("/dev/shm") / f"recserve_test_link_{uuid.uuid4().hex[:8]}"
    link.symlink_to(shm_files[0].path)
    try:
        with pytest.raises(InvalidInputError, match="cannot open key"):
            registry.register("r", "/" + link.name, 0, 8)  # no following links out of /dev/shm
    finally:
        link.unlink()
    registry.register("r", key, 0, 64)
    with pytest.raises(InvalidInputError, match="region 'r' is already registered"):
        registry.register("r", shm_files[1].key, 0, 8)
    for size in (12, 24):
        with pytest.raises(InvalidInputError, match=f"byte_size is {size}, shape \\[2\\] of int64 needs 16"):
            registry.read_inputs([("k", TensorRef("r", 0, size), np.dtype(np.int64), [2])])
    with pytest.raises(InvalidInputError, match="the inputs in shared memory are 128 bytes, more than the 100"):
        registry.read_inputs([(n, TensorRef("r", 0, 64), np.dtype(np.uint8), [64]) for n in "ab"])
    with pytest.raises(InvalidInputError, match="output 'scores': shared_memory_byte_size is 4, the output needs 8"):
        registry.write_output(TensorRef("r", 0, 4), np.zeros(2, np.float32), "output 'scores'")
    assert registry.status("r") == [{"name": "r", "key": key, "offset": 0, "byte_size": 64}]
    with pytest.raises(NotFoundError, match="status: no shared memory region 'nope'"):
        registry.status("nope")


def test_a_file_that_shrank_under_its_region_is_a_bad_request_not_a_crash(shm_files: list[ShmFile]) -> None:
    """A mapped read past a shrunk file's end is SIGBUS; the registry reads with pread and names the problem."""
    registry = SharedMemoryRegistry(enabled=True, max_request_bytes=1 << 20)
    registry.register("r", shm_files[0].key, 0, 64)
    os.truncate(shm_files[0].path, 16)
    with pytest.raises(InvalidInputError, match="holds only 16 bytes now; its file shrank"):
        registry.read_inputs([("k", TensorRef("r", 8, 16), np.dtype(np.int64), [2])])
    assert registry.read_inputs([("k", TensorRef("r", 0, 16), np.dtype(np.int64), [2])])["k"].size == 2
    registry.close()


def test_off_unless_allowed() -> None:
    """Without --allow-client-shm every part of the extension says so, and a request naming a region is refused."""
    off = "system shared memory is off on this server \\(start it with --allow-client-shm\\)"
    with pytest.raises(InvalidInputError, match=off):
        NO_SHARED_MEMORY.register("r", "/x", 0, 8)
    with pytest.raises(InvalidInputError, match=off):
        NO_SHARED_MEMORY.status()
    http_body = (b'{"inputs":[{"name":"k","shape":[2],"datatype":"INT64","parameters":'
                 b'{"shared_memory_region":"r","shared_memory_byte_size":16}}]}')
    with pytest.raises(InvalidInputError, match=off):
        codec.decode_request(http_body)
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="k", datatype="INT64", shape=[2])
    tensor.parameters["shared_memory_region"].string_param = "r"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    with pytest.raises(InvalidInputError, match=off):
        decode_infer_request(message)


def test_place_parameters_are_checked_by_name() -> None:
    where = "input 'k'"
    assert TensorRef.from_parameters({}, where) is None
    assert TensorRef.from_parameters({"shared_memory_region": "r", "shared_memory_byte_size": 8,
                                      "shared_memory_offset": 4}, where) == TensorRef("r", 4, 8)
    for parameters, message in (
        ({"shared_memory_region": "r"}, "shared_memory_region and shared_memory_byte_size must be given together"),
        ({"shared_memory_offset": 4}, "shared_memory_offset given without shared_memory_region"),
        ({"shared_memory_region": 3, "shared_memory_byte_size": 8}, "must be a region's name, got 3"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -8}, "byte_size must be an integer >= 0, got -8"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": True}, "must be an integer >= 0, got True"),
    ):
        with pytest.raises(InvalidInputError, match=f"input 'k': .*{message}"):
            TensorRef.from_parameters(parameters, where)


# --- served, through tritonclient ---

SPEC = model_spec("rmc1", "tiny")
CLIENTS = {"grpc": triton_grpc, "http": triton_http}


@pytest.fixture(scope="module")
def query_and_scores(server: Server) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An RMC1 query of 20 items (two sub-batches) and its in-process scores."""
    query = QueryGenerator(SPEC, seed=41).query(20)
    model, ps = reference_model(server.repo / "rmc1")
    with ps, torch.inference_mode():
        expected = model(query.dense, query.sparse).numpy()
    return v2_inputs(SPEC, query.dense.numpy(), query.sparse), expected


def client_of(server: Server, protocol: str) -> object:
    return CLIENTS[protocol].InferenceServerClient(server.http if protocol == "http" else server.grpc)


def region_name() -> str:
    return f"recserve_test_{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_scores_through_shared_memory_equal_in_process_scores(protocol: str, live_server: Server,
                                                              query_and_scores: tuple) -> None:
    """Inputs and the scores through regions: the in-process scores; the response names the output's place."""
    arrays, expected = query_and_scores
    client, module = client_of(live_server, protocol), CLIENTS[protocol]
    assert "system_shared_memory" in _extensions(client)
    inputs = ClientRegion(client, module, region_name(), sum(a.nbytes for a in arrays.values()))
    outputs = ClientRegion(client, module, region_name(), 4096)
    try:
        assert {inputs.name, outputs.name} <= _region_names(client)
        offset = 512  # the output anywhere in its region
        result = client.infer("rmc1", inputs.inputs(arrays), outputs=[outputs.output("scores", 4096 - offset, offset)])
        described = result.get_output("scores")
        parameters = described["parameters"] if protocol == "http" else {
            k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in described.parameters.items()}
        assert parameters == {"shared_memory_region": outputs.name, "shared_memory_byte_size": expected.nbytes,
                              "shared_memory_offset": offset}
        np.testing.assert_allclose(outputs.read(np.float32, list(expected.shape), offset), expected, rtol=1e-5,
                                   atol=1e-6)
        plain = client.infer("rmc1", inputs.inputs(arrays))  # inputs in the region, scores in the response
        np.testing.assert_allclose(plain.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)
    finally:
        inputs.close()
        outputs.close()
    assert not {inputs.name, outputs.name} & _region_names(client)


def test_grpc_mixes_inputs_in_shared_memory_with_raw_contents(live_server: Server, query_and_scores: tuple) -> None:
    """Raw contents belong to the inputs that are not in a region, in order."""
    arrays, expected = query_and_scores
    client = triton_grpc.InferenceServerClient(live_server.grpc)
    shared = {name: array for i, (name, array) in enumerate(arrays.items()) if i % 3 == 1}
    region = ClientRegion(client, triton_grpc, region_name(), sum(a.nbytes for a in shared.values()))
    try:
        placed = dict(zip(shared, region.inputs(shared), strict=True))
        carried = dict(zip(arrays, triton_inputs(triton_grpc, arrays), strict=True))
        inputs = [placed.get(name, carried[name]) for name in arrays]
        np.testing.assert_allclose(client.infer("rmc1", inputs).as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)
    finally:
        region.close()


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_bad_regions_are_refused_by_name_and_the_server_carries_on(protocol: str, live_server: Server,
                                                                   query_and_scores: tuple) -> None:
    arrays, expected = query_and_scores
    client, module = client_of(live_server, protocol), CLIENTS[protocol]
    invalid = "400" if protocol == "http" else str(grpc.StatusCode.INVALID_ARGUMENT)
    not_found = "404" if protocol == "http" else str(grpc.StatusCode.NOT_FOUND)
    size = sum(a.nbytes for a in arrays.values())
    region = ClientRegion(client, module, region_name(), size)
    try:
        def refused(call: object, status: str, message: str) -> None:
            with pytest.raises(InferenceServerException) as error:
                call()  # type: ignore[operator]
            assert error.value.status() == status and message in error.value.message(), error.value

        refused(lambda: client.register_system_shared_memory("x", "/recserve_test_absent", 8), not_found,
                "no shared memory object with key '/recserve_test_absent'")
        refused(lambda: client.register_system_shared_memory("x", "/recserve-0-t", 8), invalid,
                "one of the server's own files")
        refused(lambda: client.register_system_shared_memory(region.name, region.key, 8), invalid,
                "is already registered")
        refused(lambda: client.register_system_shared_memory("x", region.key, size + 1), invalid,
                f"offset + byte_size is {size + 1} bytes")
        inputs = region.inputs(arrays)
        inputs[0].set_shared_memory("nope", arrays["t0_keys"].nbytes)
        refused(lambda: client.infer("rmc1", inputs), not_found, "input 't0_keys': no shared memory region 'nope'")
        inputs = region.inputs(arrays)
        inputs[0].set_shared_memory(region.name, arrays["t0_keys"].nbytes - 8)
        refused(lambda: client.infer("rmc1", inputs), invalid, "input 't0_keys': shared_memory_byte_size is")
        inputs[0].set_shared_memory(region.name, arrays["t0_keys"].nbytes, size - 8)
        refused(lambda: client.infer("rmc1", inputs), invalid, "run past region")
        refused(lambda: client.infer("rmc1", region.inputs(arrays), outputs=[region.output("scores", 8)]), invalid,
                f"output 'scores': shared_memory_byte_size is 8, the output needs {expected.nbytes}")
        inputs = region.inputs(arrays)
        os.truncate(Path("/dev/shm") / region.key[1:], 64)  # the client shrinks its file under the server
        refused(lambda: client.infer("rmc1", inputs), invalid, "its file shrank")
        live_server.assert_alive()
        os.truncate(Path("/dev/shm") / region.key[1:], size)
        np.testing.assert_allclose(client.infer("rmc1", region.inputs(arrays)).as_numpy("scores"), expected,
                                   rtol=1e-5, atol=1e-6)
    finally:
        region.close()


def _extensions(client: object) -> list[str]:
    metadata = client.get_server_metadata()  # type: ignore[attr-defined]
    return metadata["extensions"] if isinstance(metadata, dict) else list(metadata.extensions)


def _region_names(client: object) -> set[str]:
    status = client.get_system_shared_memory_status()  # type: ignore[attr-defined]
    return {region["name"] for region in status} if isinstance(status, list) else set(status.regions)


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_the_load_generator_sends_through_regions_it_reuses(protocol: str, live_server: Server) -> None:
    """`recserve bench --shared-memory`: a region per query in flight, kept for the next one, all gone on close;
    each answer the in-process scores."""
    from recserve.loadgen.workload import Query

    sync_client = client_of(live_server, protocol)
    generator = QueryGenerator(SPEC, seed=43)
    queries = [generator.query(items) for items in (3, 9, 17, 30, 4, 10, 18, 29, 5, 11, 16, 31)]
    model, ps = reference_model(live_server.repo / "rmc1")
    with ps, torch.inference_mode():
        expected = [model(q.dense, q.sparse).numpy() for q in queries]
    answers: list[np.ndarray] = []

    async def run() -> set[str]:
        target = TritonTarget(live_server.http if protocol == "http" else live_server.grpc, "rmc1", SPEC, protocol,
                              shared_memory=True)
        original = target._client.infer

        async def keep_scores(*args: object, **kwargs: object) -> object:
            result = await original(*args, **kwargs)
            answers.append(result.as_numpy("scores"))
            return result

        target._client.infer = keep_scores  # the target drops answers; the test wants to see them
        try:
            for group in range(3):  # four queries in flight at once, three times over
                await asyncio.gather(*(target.infer(Query(dense=q.dense.numpy(), sparse=q.sparse), None)
                                       for q in queries[4 * group : 4 * group + 4]))
            return _region_names(sync_client)
        finally:
            await target.close()

    registered = [name for name in asyncio.run(run()) if name.startswith("loadgen-")]
    assert 1 <= len(registered) <= 4  # reused: never more regions than queries in flight
    assert not [name for name in _region_names(sync_client) if name.startswith("loadgen-")]
    assert not [f for f in os.listdir("/dev/shm") if f in registered]
    expected_by_size = {e.shape[0]: e for e in expected}
    assert len(answers) == len(queries)
    for scores in answers:
        np.testing.assert_allclose(scores, expected_by_size[scores.shape[0]], rtol=1e-5, atol=1e-6)


shm_values = (st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.integers(0, 80)
              | st.sampled_from(["r", "x", ""]) | st.lists(st.integers(0, 4), max_size=2))
any_parameters = st.dictionaries(
    st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "binary_data_size",
                     "binary_data"]), shm_values, max_size=4)
# a place that may well be read: a known or unknown region, a size, an offset
place = st.fixed_dictionaries(
    {"shared_memory_region": st.sampled_from(["r", "x"]), "shared_memory_byte_size": st.integers(0, 80)},
    optional={"shared_memory_offset": st.integers(-2, 80)})
tensor_head = {"name": st.sampled_from(["a", "b"]), "shape": st.lists(st.integers(-1, 10), max_size=2),
               "datatype": st.sampled_from(["INT64", "FP32", "UINT8", "BOOL"])}
shm_inputs = st.lists(st.one_of(
    st.fixed_dictionaries(tensor_head | {"parameters": place}),
    st.fixed_dictionaries(tensor_head, optional={"parameters": any_parameters,
                                                 "data": st.lists(st.integers(0, 3), max_size=3)}),
), min_size=1, max_size=2)
shm_outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["scores", "s"])},
                                             optional={"parameters": place | any_parameters}), max_size=2)


@settings(max_examples=300, deadline=None)
@given(inputs=shm_inputs, outputs=shm_outputs)
def test_random_shared_memory_requests_raise_only_their_errors(inputs: object, outputs: object) -> None:
    """Whatever a request says of regions, decoding it either works or raises the errors that are answered 4xx."""
    with two_files() as files:
        registry = SharedMemoryRegistry(enabled=True, max_request_bytes=1 << 20)
        registry.register("r", files[0].key, 0, 64)
        body = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
        with contextlib.suppress(InvalidInputError, NotFoundError):  # anything else fails the test
            request = codec.decode_request(body, shared_memory=registry)
            for name, ref in request.output_regions.items():
                registry.write_output(ref, np.zeros(2, np.float32), f"output '{name}'")
        registry.close()


def test_register_bodies_over_http_are_checked_by_name(live_server: Server) -> None:
    """What tritonclient would never send, a raw HTTP client may: each refused by name, nothing registered."""
    def post(path: str, body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(f"http://{live_server.http}{path}", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    with two_files() as files:
        register = "/v2/systemsharedmemory/region/raw/register"
        for body, message in (
            (b"[1, 2]", "register request must be a JSON object"),
            (b"{not json", "register request is not valid JSON"),
            (json.dumps({"key": files[0].key, "size": 8}).encode(), "unknown fields ['size']"),
            (json.dumps({"key": files[0].key}).encode(), "needs 'key' and 'byte_size'"),
            (json.dumps({"key": files[0].key, "byte_size": "8"}).encode(), "byte_size must be an integer >= 0"),
            (json.dumps({"key": files[0].key, "byte_size": 8, "offset": 1.5}).encode(), "offset must be an integer"),
        ):
            status, text = post(register, body)
            assert status == 400 and message in text, (body, status, text)
        assert "raw" not in _region_names(triton_http.InferenceServerClient(live_server.http))
        status, text = post(register, json.dumps({"key": files[0].key, "byte_size": 8}).encode())
        assert status == 200, text
        assert post("/v2/systemsharedmemory/region/raw/unregister", b"")[0] == 200
        assert post("/v2/systemsharedmemory/region/raw/unregister", b"")[0] == 200  # unknown: no error, as Triton
        status, text = post("/v2/systemsharedmemory/region/nope/status", b"")
        assert status == 405  # status is a GET
