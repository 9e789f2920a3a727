"""A real `recserve serve` process over a repository of all eight tiny models, shared by the serving tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from recserve.models.specs import MODEL_NAMES
from recserve.serve.app import spawn_server
from recserve.serve.repository import write_model_folder

STARTUP_TIMEOUT_S = 600
SERVING = {  # generous deadline: a loaded CI machine must not turn correctness tests into shedding tests
    "scheduler": {"batch_size": 16, "num_workers": 1, "latency_target_ms": 60_000, "max_queue": 4096},
    "dram": {"num_partitions": 2},
    "max_items": 4096,
}
MAX_BODY_MB = 8


@dataclass
class Server:
    process: subprocess.Popen
    http: str  # host:port
    grpc: str
    repo: Path
    log: Path

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"the server died:\n{self.log.read_text()[-4000:]}"


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in MODEL_NAMES:
        write_model_folder(repo / name, name, "tiny", num_tasks=3, seed=7, serving=SERVING)
    return repo


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    with open(log, "w") as stderr:
        try:
            spawned = spawn_server(model_repo, "--max-body-mb", str(MAX_BODY_MB), "--allow-client-shm",
                                   "--model-control", stderr=stderr, startup_timeout_s=STARTUP_TIMEOUT_S)
        except RuntimeError as error:
            raise AssertionError(f"{error}:\n{log.read_text()[-4000:]}") from None
    try:
        yield Server(spawned.process, spawned.http, spawned.grpc, model_repo, log)
    finally:
        spawned.stop()


@pytest.fixture
def live_server(server: Server) -> Iterator[Server]:
    """The shared server, checked to be up after the test (no request may kill it)."""
    server.assert_alive()
    yield server
    server.assert_alive()


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(server.http, network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(server: Server) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(server.grpc)
    yield client
    client.close()
