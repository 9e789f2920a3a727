"""The KServe v2 HTTP/REST front end (aiohttp), plus /metrics and the scheduler control endpoint.

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{model}[/versions/{v}] | .../ready | .../config | .../stats      GET /v2/models/stats
    POST /v2/models/{model}[/versions/{v}]/infer      JSON tensors or the binary tensor extension
    POST /v2/repository/index                         {"ready": true} for the ready ones only
    POST /v2/repository/models/{model}/load | unload  model control (--model-control): load, reload, unload
    GET  /v2/systemsharedmemory[/region/{name}]/status                 the system shared-memory extension
    POST /v2/systemsharedmemory/region/{name}/register                 {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/{name}]/unregister
    GET  /metrics                                     Prometheus text format
    GET | POST /v2/models/{model}/scheduler           the knobs (B, W, k, T, queue bound, latency target)

Errors answer {"error": "<what was wrong>"} with 400 / 404 / 413 / 503 / 500, as the v2 protocol says. A request
body beyond the limit is refused by aiohttp (413) before it is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from recserve.errors import InvalidInputError, RecserveError
from recserve.serve import codec
from recserve.serve.engine import MODEL_VERSION, InferenceServer, raise_unless_recserve, status_of
from recserve.serve.metrics import CONTENT_TYPE
from recserve.serve.protocol import model_config_json, model_metadata_json, server_metadata, statistics_json

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADER_LENGTH = "Inference-Header-Content-Length"


def build_app(server: InferenceServer, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors_as_json])
    app[SERVER_KEY] = server
    app[MAX_BODY_KEY] = max_body_bytes
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", _live),
        web.get("/v2/health/ready", _ready),
        web.get("/v2", _server_metadata),
        web.get("/v2/models/stats", _statistics),
        web.post("/v2/repository/index", _repository_index),
        web.post("/v2/repository/models/{model}/load", _load_model),
        web.post("/v2/repository/models/{model}/unload", _unload_model),
        web.get("/metrics", _metrics),
        web.get("/v2/systemsharedmemory/status", _shared_memory_status),
        web.get("/v2/systemsharedmemory/region/{region}/status", _shared_memory_status),
        web.post("/v2/systemsharedmemory/region/{region}/register", _shared_memory_register),
        web.post("/v2/systemsharedmemory/unregister", _shared_memory_unregister),
        web.post("/v2/systemsharedmemory/region/{region}/unregister", _shared_memory_unregister),
        web.get(f"{model}/scheduler", _scheduler),
        web.post(f"{model}/scheduler", _scheduler),
    ])
    for prefix in (model, versioned):
        app.add_routes([
            web.get(prefix, _model_metadata),
            web.get(f"{prefix}/ready", _model_ready),
            web.get(f"{prefix}/config", _model_config),
            web.get(f"{prefix}/stats", _statistics),
            web.post(f"{prefix}/infer", _infer),
        ])
    return app


SERVER_KEY = web.AppKey("server", InferenceServer)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)


def _server(request: web.Request) -> InferenceServer:
    return request.app[SERVER_KEY]


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:  # aiohttp's own: 404 route, 405, 413 body too large
        if error.status < 400:
            raise
        message = error.text or error.reason
        if error.status == 413:
            message = f"request body too large: {message}"
        return web.json_response({"error": message}, status=error.status)
    except Exception as error:
        raise_unless_recserve(error)
        status = status_of(error)[0]
        message = str(error) if isinstance(error, RecserveError) else f"internal error: {type(error).__name__}"
        return web.json_response({"error": message}, status=status)


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    ready = _server(request).ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(server_metadata(_server(request).extensions))


async def _model_metadata(request: web.Request) -> web.Response:
    model = _server(request).model(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(model_metadata_json(model))


async def _model_ready(request: web.Request) -> web.Response:
    ready = _server(request).model_ready(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response({"name": request.match_info["model"], "ready": ready}, status=200 if ready else 400)


async def _model_config(request: web.Request) -> web.Response:
    model = _server(request).model(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(model_config_json(model))


async def _statistics(request: web.Request) -> web.Response:
    server = _server(request)
    name = request.match_info.get("model")
    names = [server.model(name, request.match_info.get("version", "")).name] if name else sorted(server.models)
    return web.json_response({"model_stats": [statistics_json(n, server.statistics[n]) for n in names]})


async def _repository_index(request: web.Request) -> web.Response:
    body = await request.read()
    ready = codec.parse_json_object(body, "index request").get("ready", False) if body.strip() else False
    if not isinstance(ready, bool):
        raise InvalidInputError(f"index request: 'ready' must be true or false, got {ready!r}")
    return web.json_response(_server(request).repository_index(ready_only=ready))


async def _load_model(request: web.Request) -> web.Response:
    parameters = await _control_parameters(request, "load request")
    await asyncio.to_thread(_server(request).load_model, request.match_info["model"], parameters)  # seconds
    return web.json_response({})


async def _unload_model(request: web.Request) -> web.Response:
    parameters = await _control_parameters(request, "unload request")
    await asyncio.to_thread(_server(request).unload_model, request.match_info["model"], parameters)
    return web.json_response({})


async def _control_parameters(request: web.Request, what: str) -> dict:
    """The optional {"parameters": {...}} of a load or unload request."""
    fields = await _json_fields(request, what, known={"parameters"}, body_optional=True)
    parameters = fields.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"{what}: 'parameters' must be an object, got {type(parameters).__name__}")
    return parameters


async def _metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(_server(request).metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _scheduler(request: web.Request) -> web.Response:
    server = _server(request)
    name = request.match_info["model"]
    if request.method == "GET":
        return web.json_response(server.scheduler_state(name))
    changes = codec.parse_json_object(await request.read(), "scheduler settings")
    state = await asyncio.to_thread(server.set_scheduler, name, changes)  # starting workers takes seconds
    return web.json_response(state)


async def _shared_memory_status(request: web.Request) -> web.Response:
    return web.json_response(_server(request).shared_memory.status(request.match_info.get("region", "")))


async def _shared_memory_register(request: web.Request) -> web.Response:
    name = request.match_info["region"]
    fields = await _json_fields(request, "register request", known={"key", "offset", "byte_size"})
    if "key" not in fields or "byte_size" not in fields:
        raise InvalidInputError("register request needs 'key' and 'byte_size' (and optionally 'offset')")
    _server(request).shared_memory.register(name, fields["key"], fields.get("offset", 0), fields["byte_size"])
    return web.json_response({})


async def _json_fields(request: web.Request, what: str, known: set[str], body_optional: bool = False) -> dict:
    """A control request's JSON object body (an empty one where it may be left out), refusing fields not known."""
    body = await request.read()
    if body_optional and not body.strip():
        return {}
    fields = codec.parse_json_object(body, what)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InvalidInputError(f"{what}: unknown fields {unknown} (known: {', '.join(sorted(known))})")
    return fields


async def _shared_memory_unregister(request: web.Request) -> web.Response:
    _server(request).shared_memory.unregister(request.match_info.get("region", ""))
    return web.json_response({})


async def _infer(request: web.Request) -> web.Response:
    server = _server(request)
    name, version = request.match_info["model"], request.match_info.get("version", "")
    body = await _body(request)
    header_length = _header_length(request)
    infer_request = codec.decode_request(body, header_length, server.shared_memory)
    timeout_s = codec.timeout_parameter(infer_request.parameters)
    outputs = await server.infer(name, version, infer_request, timeout_s, "http")
    placed = server.place_outputs(infer_request, outputs)
    binary = {n: infer_request.outputs.get(n, False) or _binary_by_default(infer_request) for n in outputs}
    response_body, json_length = codec.encode_response(name, MODEL_VERSION, infer_request.id, outputs, binary,
                                                       placed)
    headers = {"Content-Type": "application/octet-stream" if json_length is not None else "application/json"}
    if json_length is not None:
        headers[HEADER_LENGTH] = str(json_length)
    return web.Response(body=response_body, headers=headers)


async def _body(request: web.Request) -> bytes:
    """The request body, joined once: `request.read()` grows a bytearray chunk by chunk and then copies it whole,
    a quarter of the front end's CPU for a 1.4 MB query. Bigger than the limit: 413, as `read` would answer."""
    limit = request.app[MAX_BODY_KEY]
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def _binary_by_default(request: codec.InferRequest) -> bool:
    """Triton's `binary_data_output` request parameter: every output binary unless one says otherwise."""
    return bool(request.parameters.get("binary_data_output", False))


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"{HEADER_LENGTH} must be an integer, got {raw!r}") from None

