"""The v2 HTTP body codec against tritonclient's own encoder and decoder, and against malformed bodies."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.errors import InvalidInputError
from recserve.serve.codec import decode_request, encode_response


def triton_body(binary: bool) -> tuple[bytes, int]:
    keys = triton.InferInput("rmc1_t0", [6], "INT64")
    keys.set_data_from_numpy(np.arange(6, dtype=np.int64) * 7, binary_data=binary)
    lengths = triton.InferInput("rmc1_t0_lengths", [2], "INT32")
    lengths.set_data_from_numpy(np.array([4, 2], dtype=np.int32), binary_data=binary)
    dense = triton.InferInput("dense", [2, 3], "FP32")
    dense.set_data_from_numpy(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), binary_data=binary)
    outputs = [triton.InferRequestedOutput("scores", binary_data=True)]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [keys, lengths, dense], outputs=outputs, request_id="q1", timeout=5000
    )
    return body, json_size


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_what_tritonclient_sends(binary: bool) -> None:
    body, json_size = triton_body(binary)
    request = decode_request(body, json_size)
    assert request.id == "q1" and request.outputs == {"scores": True}
    np.testing.assert_array_equal(request.inputs["rmc1_t0"], np.arange(6) * 7)
    assert request.inputs["rmc1_t0"].dtype == np.int64
    assert request.inputs["rmc1_t0_lengths"].dtype == np.int32
    np.testing.assert_array_equal(request.inputs["dense"], np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3))
    assert request.parameters["timeout"] == 5000


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_decodes_what_we_send(binary: bool) -> None:
    scores = np.array([[0.25], [0.75]], dtype=np.float32)
    body, header_length = encode_response("rmc1", "1", "q1", {"scores": scores}, {"scores": binary})
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    assert result.get_response()["model_name"] == "rmc1"


def header(inputs: list, **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object, got list"),
        (header([]), None, "non-empty list 'inputs'"),
        (header([{"name": "k", "shape": [2], "datatype": "INT64", "data": [1, 2]}]), 500,
         "is 500, but the body has 78 bytes"),
        (header([{"name": "k", "shape": [2], "datatype": "STRING", "data": [1, 2]}]), None, "datatype 'STRING'"),
        (header([{"name": "k", "shape": [-1], "datatype": "INT64", "data": [1]}]), None, "shape must be a list"),
        (header([{"name": "k", "shape": [3], "datatype": "INT64", "data": [1, 2]}]), None,
         r"shape \[3\] needs 3 values, data has 2"),
        (header([{"name": "k", "shape": [2], "datatype": "INT64", "data": [1.5, 2]}]), None,
         "INT64 data must be integers, got float64"),
        (header([{"name": "k", "shape": [1], "datatype": "INT32", "data": [2**40]}]), None, "outside the range"),
        (header([{"name": "k", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]), None, "must be numbers"),
        (header([{"name": "k", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]), None, "ragged"),
        (header([{"name": "k", "shape": [1], "datatype": "FP32"}]), None, "neither 'data' nor"),
        (header([{"name": "k", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "appears twice"),
        (header([{"shape": [1], "datatype": "FP32", "data": [1]}]), None, r"inputs\[0\].name must be a string"),
    ],
)
def test_malformed_bodies_are_refused_by_name(body: bytes, length: int | None, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_request(body, length)


def test_binary_payload_problems() -> None:
    body, json_size = triton_body(binary=True)
    with pytest.raises(InvalidInputError, match="input 'dense': needs 24 bytes of binary data"):
        decode_request(body[:-4], json_size)  # truncated
    with pytest.raises(InvalidInputError, match="the binary section has 84 bytes, but the inputs declare 80"):
        decode_request(body + b"\0" * 4, json_size)  # trailing bytes
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        decode_request(body, json_size - 5)  # wrong header length
    wrong = header([{"name": "k", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 12}}])
    with pytest.raises(InvalidInputError, match="binary_data_size is 12 bytes, but shape \\[2\\] of INT64 needs 16"):
        decode_request(wrong + b"\0" * 12, len(wrong))


@settings(max_examples=400)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400)))
def test_random_bodies_raise_only_invalid_input(body: bytes, length: int | None) -> None:
    with contextlib.suppress(InvalidInputError):  # any other exception fails the test
        decode_request(body, length)


FIELDS = ["name", "shape", "datatype", "data", "parameters", "binary_data_size", "id", "outputs", "binary_data"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=4)
    | st.sampled_from(["INT64", "FP32", "BOOL", "INT8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400)
@given(inputs=json_values, tail=st.binary(max_size=64))
def test_random_json_requests_raise_only_invalid_input(inputs: object, tail: bytes) -> None:
    head = json.dumps({"inputs": inputs}).encode()
    with contextlib.suppress(InvalidInputError):
        decode_request(head + tail, len(head))
