"""Bad input, through tritonclient and raw HTTP / gRPC: each gets a 4xx / INVALID_ARGUMENT (or 503) naming the
problem, and the server answers the next good request correctly. Then overload, disconnects and fuzzing."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from recserve.loadgen.targets import triton_inputs
from recserve.models.specs import model_spec
from recserve.models.synthetic import QueryGenerator
from recserve.serve.app import raise_open_file_limit
from tests.conftest import reference_model, v2_inputs
from tests.serve.conftest import MAX_BODY_MB, Server

SPEC = model_spec("ncf", "tiny")
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def good(server: Server) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A good NCF query of 6 items and its in-process scores."""
    query = QueryGenerator(SPEC, seed=31).query(6)
    model, ps = reference_model(server.repo / "ncf")
    with ps, torch.inference_mode():
        expected = model(None, query.sparse).numpy()
    return v2_inputs(SPEC, None, query.sparse), expected


@pytest.fixture
def then_good_request(live_server: Server, good: tuple, http: triton_http.InferenceServerClient,
                      grpc_client: triton_grpc.InferenceServerClient) -> Iterator[None]:
    """After the test's bad input: the server is up and answers a good request correctly on both front ends."""
    yield
    arrays, expected = good
    np.testing.assert_allclose(http.infer("ncf", triton_inputs(triton_http, arrays)).as_numpy("scores"), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grpc_client.infer("ncf", triton_inputs(triton_grpc, arrays)).as_numpy("scores"),
                               expected, rtol=1e-5, atol=1e-6)


def changed(arrays: dict[str, np.ndarray], **changes: np.ndarray | None) -> dict[str, np.ndarray]:
    out = dict(arrays)
    for name, value in changes.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


BAD_QUERIES: dict[str, tuple[Callable[[dict], dict], int, grpc.StatusCode, str]] = {
    "missing input": (lambda a: changed(a, item_gmf_keys=None), 400, grpc.StatusCode.INVALID_ARGUMENT,
                      "missing inputs ['item_gmf_keys']"),
    "extra input": (lambda a: changed(a, bogus=np.zeros(3, np.int64)), 400, grpc.StatusCode.INVALID_ARGUMENT,
                    "unexpected inputs ['bogus']"),
    "wrong dtype": (lambda a: changed(a, user_gmf_keys=a["user_gmf_keys"].astype(np.float32)), 400,
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'user_gmf_keys': datatype must be INT64, got FP32"),
    "wrong shape": (lambda a: changed(a, user_mlp_keys=a["user_mlp_keys"].reshape(2, 3)), 400,
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'user_mlp_keys': shape must be ['N'], got [2, 3]"),
    "lengths off": (lambda a: changed(a, item_mlp_lengths=a["item_mlp_lengths"] * 2), 400,
                    grpc.StatusCode.INVALID_ARGUMENT, "offsets end at 12 but there are 6 keys"),
    "negative lengths": (lambda a: changed(a, item_mlp_lengths=np.array([2, -1, 1, 1, 2, 1], np.int64)), 400,
                         grpc.StatusCode.INVALID_ARGUMENT, "lengths must be >= 0, got -1"),
    "empty query": (lambda a: {k: v[:0] for k, v in a.items()}, 400, grpc.StatusCode.INVALID_ARGUMENT,
                    "empty query"),
    "too many items": (lambda a: {k: np.ones(5000, np.int64) for k in a}, 400, grpc.StatusCode.INVALID_ARGUMENT,
                       "has 5000 items, model 'ncf' takes at most 4096"),
}


@pytest.mark.parametrize("case", list(BAD_QUERIES))
def test_bad_queries_through_tritonclient(case: str, good: tuple, http: triton_http.InferenceServerClient,
                                          grpc_client: triton_grpc.InferenceServerClient,
                                          then_good_request: None) -> None:
    make, status, code, message = BAD_QUERIES[case]
    arrays = make(good[0])
    with pytest.raises(InferenceServerException) as http_error:
        http.infer("ncf", triton_inputs(triton_http, arrays))
    assert http_error.value.status() == str(status) and message in http_error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_client.infer("ncf", triton_inputs(triton_grpc, arrays))
    assert grpc_error.value.status() == str(code) and message in grpc_error.value.message()


def test_unknown_model(server: Server, good: tuple, http: triton_http.InferenceServerClient,
                       grpc_client: triton_grpc.InferenceServerClient, then_good_request: None) -> None:
    for client, module in ((http, triton_http), (grpc_client, triton_grpc)):
        with pytest.raises(InferenceServerException, match=r"unknown model 'nope' \(serving: .*ncf"):
            client.infer("nope", triton_inputs(module, good[0]))
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        http.infer("ncf", triton_inputs(triton_http, good[0]), model_version="7")
    status, body = raw_http(http_address(server), "GET", "/v2/models/nope", b"")
    assert status == 404 and b"unknown model 'nope'" in body


def test_ten_million_items_are_refused_by_size(good: tuple, http: triton_http.InferenceServerClient,
                                              grpc_client: triton_grpc.InferenceServerClient,
                                              then_good_request: None) -> None:
    arrays = {name: np.ones(10_000_000, dtype=np.int64) for name in good[0]}  # 320 MB of keys and lengths
    with pytest.raises(InferenceServerException) as http_error:
        http.infer("ncf", triton_inputs(triton_http, arrays))
    assert http_error.value.status() == "413" and "too large" in http_error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_client.infer("ncf", triton_inputs(triton_grpc, arrays))
    assert grpc_error.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert MAX_BODY_MB * (1 << 20) < 320 << 20


# --- raw HTTP ---


def http_address(server: Server) -> tuple[str, int]:
    host, port = server.http.rsplit(":", 1)
    return host, int(port)


def raw_http(address: tuple[str, int], method: str, path: str, body: bytes, headers: dict[str, str] | None = None,
             content_length: int | None = None) -> tuple[int, bytes]:
    """One request on a fresh socket; returns (status, body) of the answer ((0, b"") if the server hung up)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address[0]}", "Connection: close",
             f"Content-Length: {len(body) if content_length is None else content_length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        if content_length is not None and content_length > len(body):
            sock.shutdown(socket.SHUT_WR)  # promised more than we send: the server sees the end of the stream
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer:
        return 0, b""
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


def infer_path() -> str:
    return "/v2/models/ncf/infer"


def json_body(arrays: dict[str, np.ndarray]) -> dict:
    return {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.tolist()}
                       for n, a in arrays.items()]}


def test_raw_http_good_json_request(server: Server, good: tuple, http: triton_http.InferenceServerClient) -> None:
    status, body = raw_http(http_address(server), "POST", infer_path(), json.dumps(json_body(good[0])).encode())
    assert status == 200
    scores = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(-1, 1)
    np.testing.assert_allclose(scores, good[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b'{"inputs": [', {}, "request header is not valid JSON"),
    (b"[1, 2]", {}, "must be a JSON object"),
    (b'{"inputs": []}', {}, "non-empty list 'inputs'"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 16}}]}'
     + b"\x00" * 8, None, "needs 16 bytes of binary data at offset 0, the body has 8"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}', {
        "Inference-Header-Content-Length": "9999"}, "Inference-Header-Content-Length is 9999"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}', {
        "Inference-Header-Content-Length": "ten"}, "must be an integer"),
    (b'{"inputs": [{"name": "x", "shape": [-2], "datatype": "INT64", "data": [1, 2]}]}', {}, "shape must be"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "STRING", "data": ["a", "b"]}]}', {}, "datatype"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}], "parameters": '
     b'{"timeout": -5}}', {}, "parameter 'timeout' must be a positive number"),
    (b"[" * 100_000 + b"]" * 100_000, {}, "not valid JSON"),
])
def test_malformed_http_bodies(server: Server, body: bytes, headers: dict | None, message: str, good: tuple,
                               http: triton_http.InferenceServerClient, then_good_request: None) -> None:
    if headers is None:  # a truncated binary section: the header length is the JSON part
        json_end = body.index(b"}]}") + 3
        headers = {"Inference-Header-Content-Length": str(json_end)}
    status, answer = raw_http(http_address(server), "POST", infer_path(), body, headers)
    assert status == 400, answer
    assert message in json.loads(answer)["error"]


def test_wrong_content_length(server: Server, good: tuple, then_good_request: None) -> None:
    body = json.dumps(json_body(good[0])).encode()
    status, _ = raw_http(http_address(server), "POST", infer_path(), body, content_length=len(body) + 1000)
    assert status in (0, 400)  # the body never completes: no answer, or a 400; never a crash
    status, answer = raw_http(http_address(server), "POST", infer_path(), body, content_length=len(body) // 2)
    # half a JSON document, then bytes the length did not announce: refused (by us or by the HTTP parser)
    assert status == 400 and (b"not valid JSON" in answer or b"Data after" in answer), answer[:200]
    status, _ = raw_http(http_address(server), "POST", infer_path(), body, content_length=-5)
    assert status == 400


def test_client_gone_mid_flight(server: Server, good: tuple, http: triton_http.InferenceServerClient,
                                grpc_client: triton_grpc.InferenceServerClient, then_good_request: None) -> None:
    big = {name: np.ones(4000, np.int64) for name in good[0]}  # 4,000 items: takes a while
    outcomes: list[object] = []
    call = grpc_client.async_infer("ncf", triton_inputs(triton_grpc, big), lambda result, error: outcomes.append(
        error or result))
    time.sleep(0.05)
    call.cancel()  # the client gives up while the query is queued or running
    time.sleep(0.5)
    assert outcomes and isinstance(outcomes[0], InferenceServerException) and "CANCELLED" in str(outcomes[0])
    body = json.dumps(json_body(big)).encode()
    for _ in range(5):  # send, then hang up before the answer
        with socket.create_connection(http_address(server), timeout=30) as sock:
            sock.sendall(f"POST {infer_path()} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)


def test_a_timeout_parameter_that_cannot_be_met_is_refused(good: tuple, http: triton_http.InferenceServerClient,
                                                           grpc_client: triton_grpc.InferenceServerClient,
                                                           then_good_request: None) -> None:
    big = {name: np.ones(4000, np.int64) for name in good[0]}
    http.infer("ncf", triton_inputs(triton_http, good[0]))  # the cost model has seen a query
    with pytest.raises(InferenceServerException) as error:
        http.infer("ncf", triton_inputs(triton_http, big), timeout=1)  # one microsecond, Triton's unit
    assert error.value.status() == "503" and "deadline" in error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_client.infer("ncf", triton_inputs(triton_grpc, big), timeout=1)
    assert grpc_error.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)


# --- overload ---


def test_a_thousand_concurrent_connections(live_server: Server, good: tuple, http: triton_http.InferenceServerClient,
                                           then_good_request: None) -> None:
    raise_open_file_limit()  # as the server does: every connection is a descriptor, here and there
    body = json.dumps(json_body(good[0])).encode()
    request = (f"POST {infer_path()} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    host, port = http_address(live_server)

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return int(answer.split(b" ")[1]) if answer else 0

    async def all_at_once() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(1000)))

    statuses = asyncio.run(all_at_once())
    assert len(statuses) == 1000 and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > 0


def test_overload_is_refused_with_503_and_resource_exhausted(live_server: Server, good: tuple,
                                                      http: triton_http.InferenceServerClient,
                                                      grpc_client: triton_grpc.InferenceServerClient,
                                                      then_good_request: None) -> None:
    from tests.serve.test_server import post_json

    url = f"http://{live_server.http}/v2/models/ncf/scheduler"
    big = {name: np.ones(4000, np.int64) for name in good[0]}
    post_json(url, {"max_queue": 1})
    try:
        async def flood() -> list:
            client = triton_grpc_aio.InferenceServerClient(live_server.grpc)
            inputs = triton_inputs(triton_grpc, big)
            results = await asyncio.gather(*(client.infer("ncf", inputs) for _ in range(8)), return_exceptions=True)
            await client.close()
            return results

        results = asyncio.run(flood())
        refused = [r for r in results if isinstance(r, InferenceServerException)]
        assert refused and all(r.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED) for r in refused)
        assert all("queue full (1 of 1 queries waiting)" in r.message() for r in refused)
        assert any(not isinstance(r, Exception) for r in results)
    finally:
        post_json(url, {"max_queue": 4096})


# --- fuzzing ---


def mutations(seed: int, good_body: bytes, count: int) -> Iterator[bytes]:
    """Random bytes, random JSON, and valid bodies with bytes flipped, cut or repeated."""
    rng = random.Random(seed)
    atoms = [None, True, 0, -1, 2**70, 1.5, "x", "INT64", "FP32", [], {}, [1, 2], {"name": "dense"}]
    for i in range(count):
        kind = i % 4
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            doc = {"inputs": [{rng.choice(["name", "shape", "datatype", "data", "parameters"]): rng.choice(atoms)
                               for _ in range(rng.randrange(0, 6))} for _ in range(rng.randrange(0, 4))]}
            yield json.dumps(doc).encode()
        elif kind == 2:
            body = bytearray(good_body)
            for _ in range(rng.randrange(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            yield bytes(body)
        else:
            cut = rng.randrange(len(good_body))
            yield good_body[:cut] + good_body[cut:][: rng.randrange(0, 50)] * rng.randrange(1, 3)


def test_fuzz_http(live_server: Server, good: tuple, http: triton_http.InferenceServerClient,
                   then_good_request: None) -> None:
    host, port = http_address(live_server)
    good_body = json.dumps(json_body(good[0])).encode()

    async def send(body: bytes) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST {infer_path()} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                     f"{len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return int(answer.split(b" ")[1])

    async def run() -> list[int]:
        statuses = []
        bodies = list(mutations(1, good_body, 2000))
        for start in range(0, len(bodies), 50):
            statuses += await asyncio.gather(*(send(b) for b in bodies[start : start + 50]))
        return statuses

    statuses = asyncio.run(run())
    assert len(statuses) == 2000 and set(statuses) <= {200, 400, 404, 503}, sorted(set(statuses))
    assert statuses.count(400) > 1000


def test_fuzz_grpc(live_server: Server, good: tuple, then_good_request: None) -> None:
    request = triton_grpc.service_pb2.ModelInferRequest(model_name="ncf")
    for name, array in good[0].items():
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    good_message = request.SerializeToString()
    codes: list[grpc.StatusCode] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(live_server.grpc) as channel:
            call = channel.unary_unary(INFER)  # raw bytes both ways: no client-side checks
            bodies = list(mutations(2, good_message, 2000))
            for start in range(0, len(bodies), 50):
                results = await asyncio.gather(*(call(b, timeout=60) for b in bodies[start : start + 50]),
                                               return_exceptions=True)
                for result in results:
                    codes.append(result.code() if isinstance(result, grpc.aio.AioRpcError) else grpc.StatusCode.OK)

    asyncio.run(run())
    assert len(codes) == 2000
    unexpected = set(codes) - {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                               grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert not unexpected  # corrupt messages included: INVALID_ARGUMENT, never UNKNOWN or INTERNAL
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 500


def test_binary_tail_lengths_are_checked_per_input(server: Server, good: tuple, http: triton_http.InferenceServerClient,
                                                   then_good_request: None) -> None:
    """A binary body whose inputs claim more bytes than follow the header: named, not read past the end."""
    keys = np.arange(4, dtype=np.int64).tobytes()
    header = json.dumps({"inputs": [
        {"name": "user_gmf_keys", "shape": [4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
        {"name": "user_gmf_lengths", "shape": [4], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
    ]}).encode()
    status, answer = raw_http(http_address(server), "POST", infer_path(), header + keys + struct.pack("<q", 1),
                              {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"input 'user_gmf_lengths': needs 32 bytes of binary data at offset 32" in answer
