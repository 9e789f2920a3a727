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
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from recserve.serve.engine import InferenceServer
from recserve.serve.grpc_server import build_server
from recserve.serve.http_server import build_app

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    repo: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    max_body_bytes: int = 64 << 20


def run(options: ServeOptions) -> None:
    _raise_open_file_limit()
    asyncio.run(serve(options))


async def serve(options: ServeOptions) -> None:
    server = InferenceServer(options.repo)
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
            await stopping
    finally:
        await asyncio.to_thread(lambda: grpc_server.stop(grace=1.0).wait())
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(server.close)


def _raise_open_file_limit() -> None:
    """Every client connection is a file descriptor; the usual soft limit (1,024) is far below the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
