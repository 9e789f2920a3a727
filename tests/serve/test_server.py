"""The served models through Triton's own clients: metadata, scores equal to in-process calls, metrics, control."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

from recserve.loadgen.targets import triton_inputs
from recserve.models.specs import MODEL_NAMES
from recserve.models.synthetic import QueryGenerator
from tests.conftest import reference_model, v2_inputs
from tests.serve.conftest import Server

_REFERENCES: dict[str, tuple] = {}


def expected_scores(repo: Path, name: str, query: object) -> np.ndarray:
    if name not in _REFERENCES:
        _REFERENCES[name] = reference_model(repo / name)
    model, _ = _REFERENCES[name]
    with torch.inference_mode():
        return model(query.dense, query.sparse).numpy()  # type: ignore[attr-defined]


def test_health_metadata_and_config(live_server: Server, http: triton_http.InferenceServerClient,
                                    grpc_client: triton_grpc.InferenceServerClient) -> None:
    for client in (http, grpc_client):
        assert client.is_server_live() and client.is_server_ready()
        assert all(client.is_model_ready(name) for name in MODEL_NAMES)
        assert not client.is_model_ready("nope")
    assert http.get_server_metadata()["name"] == "recserve"
    assert "binary_tensor_data" in grpc_client.get_server_metadata().extensions
    meta = http.get_model_metadata("rmc1")
    assert [i["name"] for i in meta["inputs"]][:2] == ["t0_keys", "t0_lengths"]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 1]}]
    grpc_meta = grpc_client.get_model_metadata("mtwnd")
    assert grpc_meta.outputs[0].shape == [-1, 3] and grpc_meta.inputs[-1].name == "dense"
    config = grpc_client.get_model_config("din").config
    assert config.name == "din" and len(config.input) == 2 * 253
    assert http.get_model_config("rmc1")["input"][0] == {"name": "t0_keys", "data_type": "TYPE_INT64", "dims": [-1]}
    index = http.get_model_repository_index()
    assert sorted(m["name"] for m in index) == sorted(MODEL_NAMES) and {m["state"] for m in index} == {"READY"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_served_scores_equal_in_process_scores(name: str, live_server: Server,
                                               http: triton_http.InferenceServerClient,
                                               grpc_client: triton_grpc.InferenceServerClient) -> None:
    """20 items (two sub-batches of B=16) through gRPC, HTTP binary and HTTP JSON: the in-process scores."""
    spec_query = QueryGenerator(_spec(name), seed=21).query(20)
    arrays = v2_inputs(_spec(name), spec_query.dense.numpy(), spec_query.sparse)
    expected = expected_scores(live_server.repo, name, spec_query)
    answers = {
        "grpc": grpc_client.infer(name, triton_inputs(triton_grpc, arrays)),
        "http-binary": http.infer(name, triton_inputs(triton_http, arrays, binary=True),
                                  outputs=[triton_http.InferRequestedOutput("scores", binary_data=True)]),
        "http-json": http.infer(name, triton_inputs(triton_http, arrays, binary=False),
                                outputs=[triton_http.InferRequestedOutput("scores", binary_data=False)]),
    }
    for protocol, answer in answers.items():
        scores = answer.as_numpy("scores")
        assert scores.shape == expected.shape, protocol
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6, err_msg=protocol)


def test_metrics_report_requests_latency_tiers_and_knobs(live_server: Server,
                                                         grpc_client: triton_grpc.InferenceServerClient) -> None:
    query = QueryGenerator(_spec("rmc1"), seed=22).query(5)
    grpc_client.infer("rmc1", triton_inputs(triton_grpc, v2_inputs(_spec("rmc1"), query.dense.numpy(), query.sparse)))
    deadline = time.monotonic() + 10
    while True:  # workers report lookup counters with results or when idle (within a second)
        samples = scrape(live_server)
        hits = samples.get(("recserve_ps_hits_total", (("table", "rmc1_t0"), ("tier", "dram"))), 0)
        if hits > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hits > 0
    assert samples[("recserve_requests_total", (("model", "rmc1"), ("outcome", "ok"), ("protocol", "grpc")))] >= 1
    assert samples[("recserve_items_total", (("model", "rmc1"),))] >= 5
    assert samples[("recserve_latency_seconds_count", (("model", "rmc1"), ("stage", "total")))] >= 1
    assert samples[("recserve_latency_seconds_count", (("model", "rmc1"), ("stage", "queue")))] >= 1
    assert samples[("recserve_scheduler", (("knob", "batch_size"), ("model", "rmc1")))] == 16
    assert samples[("recserve_scheduler", (("knob", "num_workers"), ("model", "rmc1")))] == 1
    assert samples[("recserve_ps_rows", (("table", "rmc1_t0"), ("tier", "dram")))] == 1000
    assert samples[("recserve_ps_evictions_total", (("table", "rmc1_t0"), ("tier", "dram")))] == 0
    assert ("recserve_rejections_total", (("model", "rmc1"), ("reason", "queue_full"))) in samples


def test_statistics_count_items_and_executions(live_server: Server, http: triton_http.InferenceServerClient,
                                               grpc_client: triton_grpc.InferenceServerClient) -> None:
    before = http.get_inference_statistics("ncf")["model_stats"][0]
    query = QueryGenerator(_spec("ncf"), seed=23).query(40)  # 3 sub-batches of 16
    grpc_client.infer("ncf", triton_inputs(triton_grpc, v2_inputs(_spec("ncf"), None, query.sparse)))
    after = grpc_client.get_inference_statistics("ncf").model_stats[0]
    assert after.inference_count - int(before.get("inference_count", 0)) == 40
    assert after.execution_count - int(before.get("execution_count", 0)) == 3
    assert after.inference_stats.success.count >= 1 and after.inference_stats.success.ns > 0
    every = http.get_inference_statistics()["model_stats"]
    assert sorted(s["name"] for s in every) == sorted(MODEL_NAMES)


def test_scheduler_knobs_are_live(live_server: Server, http: triton_http.InferenceServerClient) -> None:
    url = f"http://{live_server.http}/v2/models/wnd/scheduler"
    state = json.loads(urllib.request.urlopen(url).read())
    assert (state["batch_size"], state["num_workers"], state["threads_per_worker"]) == (16, 1, 1)
    assert state["accelerator_available"] is False  # no CUDA here: T is ignored
    query = QueryGenerator(_spec("wnd"), seed=24).query(30)
    arrays = v2_inputs(_spec("wnd"), query.dense.numpy(), query.sparse)
    expected = expected_scores(live_server.repo, "wnd", query)
    try:
        changed = post_json(url, {"batch_size": 4, "num_workers": 2, "accelerator_threshold": 8,
                                  "latency_target_ms": 30_000})
        assert (changed["batch_size"], changed["num_workers"], changed["accelerator_threshold"]) == (4, 2, 8)
        assert changed["latency_target_ms"] == 30_000
        samples = scrape(live_server)
        assert samples[("recserve_scheduler", (("knob", "num_workers"), ("model", "wnd")))] == 2
        answer = http.infer("wnd", triton_inputs(triton_http, arrays))
        np.testing.assert_allclose(answer.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)
        assert http.get_inference_statistics("wnd")["model_stats"][0]["execution_count"] >= 8  # 30 items / B=4
    finally:
        post_json(url, {"batch_size": 16, "num_workers": 1, "accelerator_threshold": None,
                        "latency_target_ms": 60_000})


@pytest.mark.parametrize(("body", "message"), [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_sise": 4}, "unknown scheduler settings"),
    ({"num_workers": "2"}, "must be an integer"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_scheduler_settings_are_refused(live_server: Server, body: object, message: str) -> None:
    url = f"http://{live_server.http}/v2/models/wnd/scheduler"
    status, answer = post_json_status(url, body)
    assert status == 400 and message in answer["error"]
    assert json.loads(urllib.request.urlopen(url).read())["batch_size"] == 16


# --- helpers ---


def _spec(name: str) -> object:
    from recserve.models.specs import model_spec

    return model_spec(name, "tiny", num_tasks=3)


def scrape(server: Server) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://{server.http}/metrics").read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def post_json(url: str, body: object) -> dict:
    status, answer = post_json_status(url, body)
    assert status == 200, answer
    return answer


def post_json_status(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
