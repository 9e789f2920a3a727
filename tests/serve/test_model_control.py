"""Model control (Triton's model repository extension, explicit mode; the test server runs with --model-control):
unload and load through tritonclient, a reload under load that answers every query, and control requests that
are refused by name while the server carries on."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from recserve.errors import InvalidInputError
from recserve.loadgen.targets import triton_inputs
from recserve.models.checkpoint import checkpoint_spec
from recserve.models.synthetic import QueryGenerator
from recserve.serve.engine import InferenceServer
from tests.conftest import reference_model, v2_inputs
from tests.serve.conftest import Server


def query_and_scores(server: Server, folder: str, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    spec = checkpoint_spec(server.repo / folder)
    query = QueryGenerator(spec, seed=seed).query(12)
    model, ps = reference_model(server.repo / folder)
    with ps, torch.inference_mode():
        expected = model(query.dense, query.sparse).numpy()
    return v2_inputs(spec, query.dense.numpy(), query.sparse), expected


def worker_processes(server: Server) -> int:
    tasks = Path(f"/proc/{server.process.pid}/task")
    return sum(len((task / "children").read_text().split()) for task in tasks.iterdir())


def test_unload_then_load_through_both_clients(live_server: Server, http: triton_http.InferenceServerClient,
                                               grpc_client: triton_grpc.InferenceServerClient) -> None:
    arrays, expected = query_and_scores(live_server, "dien", seed=51)
    workers = worker_processes(live_server)
    grpc_client.unload_model("dien")
    assert not http.is_model_ready("dien") and not grpc_client.is_model_ready("dien")
    with pytest.raises(InferenceServerException, match="unknown model 'dien'") as refused:
        http.infer("dien", triton_inputs(triton_http, arrays))
    assert refused.value.status() == "404"
    assert {"name": "dien", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in (
        http.get_model_repository_index())
    assert "dien" not in {m.name for m in grpc_client.get_model_repository_index().models if m.state == "READY"}
    assert worker_processes(live_server) < workers  # its workers are gone
    http.load_model("dien")
    assert http.is_model_ready("dien") and worker_processes(live_server) == workers
    for answer in (http.infer("dien", triton_inputs(triton_http, arrays)),
                   grpc_client.infer("dien", triton_inputs(triton_grpc, arrays))):
        np.testing.assert_allclose(answer.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)


def test_a_model_loaded_later_reloads_under_load_and_answers_every_query(
        live_server: Server, http: triton_http.InferenceServerClient) -> None:
    """A model not served at start (NCF's checkpoint with half its rows in DRAM over RocksDB) is loaded, then
    reloaded twice while four clients keep querying: each new copy builds its store beside the old copy's (which
    holds its own open), the old copy closes once its queries are answered; every answer arrives, and is right."""
    folder = live_server.repo / "ncf_stored"
    shutil.copytree(live_server.repo / "ncf", folder)
    (folder / "serve.yaml").write_text(
        "scheduler: {batch_size: 16, num_workers: 1, latency_target_ms: 60000, max_queue: 4096}\n"
        "dram: {num_partitions: 2}\nrocksdb: {enabled: true}\ndram_fraction: 0.5\n")
    stop = threading.Event()
    answers: list[np.ndarray] = []
    errors: list[Exception] = []
    try:
        arrays, expected = query_and_scores(live_server, "ncf_stored", seed=52)
        workers = worker_processes(live_server)
        http.load_model("ncf_stored")
        assert worker_processes(live_server) == workers + 1

        def keep_querying() -> None:
            client = triton_grpc.InferenceServerClient(live_server.grpc)
            inputs = triton_inputs(triton_grpc, arrays)
            while not stop.is_set():
                try:
                    answers.append(client.infer("ncf_stored", inputs).as_numpy("scores"))
                except Exception as error:
                    errors.append(error)

        threads = [threading.Thread(target=keep_querying) for _ in range(4)]  # queries queue behind one worker
        for thread in threads:
            thread.start()
        try:
            for _ in range(2):
                before = len(answers)
                http.load_model("ncf_stored")
                assert len(answers) > before  # the old copy answered while the new one loaded
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert not errors, errors[:3]
        assert answers
        for scores in answers:
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
        assert worker_processes(live_server) == workers + 1  # each old copy closed
        assert (folder / "recserve-store").is_dir() and (folder / "recserve-store.alt").is_dir()
    finally:
        stop.set()
        if http.is_model_ready("ncf_stored"):
            http.unload_model("ncf_stored")
        shutil.rmtree(folder)
    assert "ncf_stored" not in {m["name"] for m in http.get_model_repository_index()}


def test_control_requests_are_refused_by_name_and_the_server_carries_on(
        live_server: Server, http: triton_http.InferenceServerClient,
        grpc_client: triton_grpc.InferenceServerClient) -> None:
    not_found, invalid = str(grpc.StatusCode.NOT_FOUND), str(grpc.StatusCode.INVALID_ARGUMENT)
    for call, status, message in (
        (lambda: http.load_model("nope"), "404", "no model 'nope' in repository"),
        (lambda: grpc_client.load_model("../ncf"), not_found, "no model '../ncf' in repository"),
        (lambda: http.unload_model("nope"), "404", "model 'nope' is not loaded"),
        (lambda: grpc_client.load_model("ncf", config="{}"), invalid, "parameters ['config'] are not supported"),
        (lambda: http.load_model("ncf", files={"file:1/model.pt": b"x"}), "400", "are not supported"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == status and message in refused.value.message(), refused.value

    broken = live_server.repo / "broken"
    broken.mkdir()
    try:
        (broken / "model.json").write_text("{not json")
        assert {"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in (
            http.get_model_repository_index())
        with pytest.raises(InferenceServerException, match="model.json: not a recserve checkpoint") as refused:
            http.load_model("broken")
        assert refused.value.status() == "400"
        shutil.copytree(live_server.repo / "ncf", broken, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("recserve-store*"))
        (broken / "serve.yaml").write_text("scheduler: {batch_sise: 8}\n")
        with pytest.raises(InferenceServerException, match="batch_sise") as refused:
            grpc_client.load_model("broken")
        assert refused.value.status() == invalid
        assert not http.is_model_ready("broken")
    finally:
        shutil.rmtree(broken)
    arrays, expected = query_and_scores(live_server, "ncf", seed=53)
    np.testing.assert_allclose(http.infer("ncf", triton_inputs(triton_http, arrays)).as_numpy("scores"), expected,
                               rtol=1e-5, atol=1e-6)


def test_model_control_is_off_unless_asked(tmp_path: Path) -> None:
    server = InferenceServer(tmp_path)
    for call in (lambda: server.load_model("ncf"), lambda: server.unload_model("ncf")):
        with pytest.raises(InvalidInputError, match="model control is off on this server \\(start it with "
                                                    "--model-control"):
            call()
