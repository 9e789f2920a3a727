"""`recserve serve`: both front ends on one event loop, the models loading behind them.

The front ends listen first and answer live-but-not-ready while the repository loads (in a thread), so that
orchestration can tell "starting" from "dead". Once listening, one JSON line on stdout gives the ports (useful
with port 0); "ready" follows when every model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiohttp import web

from recserve.serve.engine import InferenceServer
from recserve.serve.grpc_server import build_server
from recserve.serve.http_server import build_app
from recserve.serve.online_tuning import OnlineTuning
from recserve.serve.shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    repo: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    max_body_bytes: int = 64 << 20
    online_tuning: bool = False  # re-tune every model on its live traffic (else as each serve.yaml says)
    allow_client_shm: bool = False  # clients may register /dev/shm regions for their tensors (Triton's flag)
    model_control: bool = False  # clients may load, reload and unload models (Triton's explicit mode)


def run(options: ServeOptions) -> None:
    raise_open_file_limit()
    asyncio.run(serve(options))


async def serve(options: ServeOptions) -> None:
    shared_memory = SharedMemoryRegistry(options.allow_client_shm, options.max_body_bytes)
    server = InferenceServer(options.repo, options.online_tuning, shared_memory, options.model_control)
    tuning = OnlineTuning(server)
    runner = web.AppRunner(build_app(server, options.max_body_bytes), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.http_port, backlog=4096)
    await site.start()
    grpc_server = build_server(server, options.max_body_bytes)
    grpc_host = f"[{options.host}]" if ":" in options.host else options.host
    grpc_port = grpc_server.add_insecure_port(f"{grpc_host}:{options.grpc_port}")
    grpc_server.start()
    http_port = runner.addresses[0][1]
    print(json.dumps({"host": options.host, "http_port": http_port, "grpc_port": grpc_port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loading = asyncio.ensure_future(asyncio.to_thread(server.load))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a model that cannot load stops the server, naming the problem
            print(f"ready: serving {', '.join(sorted(server.models))}", flush=True)
            tuning.start()
            await stopping
    finally:
        await asyncio.to_thread(tuning.stop)
        await asyncio.to_thread(lambda: grpc_server.stop(grace=1.0).wait())
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(server.close)


def raise_open_file_limit() -> None:
    """Every client connection is a file descriptor; the usual soft limit (1,024) is far below the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class ServerProcess:
    """`recserve serve` in a child process (the demo, benchmarks and tests drive a real one)."""

    process: subprocess.Popen
    http: str  # host:port
    grpc: str

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_server(repo: Path, *extra_args: str, stderr: IO | None = None,
                 startup_timeout_s: float = 600.0) -> ServerProcess:
    """Start `recserve serve` on free loopback ports and return once it reports ready."""
    command = [sys.executable, "-m", "recserve.cli", "serve", "--repo", str(repo), "--http-port", "0",
               "--grpc-port", "0", *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ports = json.loads(_line(process, startup_timeout_s) or "null")
        ready = _line(process, startup_timeout_s)
        if not ports or not ready.startswith("ready"):
            raise RuntimeError(f"recserve serve did not become ready (exit code {process.poll()})")
    except BaseException:
        process.kill()
        process.wait()
        raise
    host = ports["host"]
    return ServerProcess(process, f"{host}:{ports['http_port']}", f"{host}:{ports['grpc_port']}")


def _line(process: subprocess.Popen, timeout_s: float) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout_s)
    return process.stdout.readline().strip() if readable else ""
