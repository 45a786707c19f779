"""The server's one port (aiohttp): the WebSocket protocol at `/ws`, OpenAI speech at `/v1/audio/speech`,
`/v1/models`, `/health`, Prometheus `/metrics`, and the web client (package data) for everything else.

Security: the WebSocket, the `/v1` API and `/metrics` need the token when one is set (`?token=` or
`Authorization: Bearer`); browser Origins other than the server's own page (or `allowed_origins`) are refused on
the WebSocket and on POSTs, so a foreign page cannot drive the model.
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from csm_jax.serving.config import NetConfig
from csm_jax.serving.fields import ProtocolError
from csm_jax.serving.protocol import Connection
from csm_jax.serving.service import Service
from csm_jax.serving.speech_api import openai_error, speech

log = logging.getLogger(__name__)
WS_PATH = "/ws"
SPEECH_PATH = "/v1/audio/speech"
MAX_PATH_CHARS = 1024
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
METHODS = {SPEECH_PATH: ("POST",)}  # every other path: GET and HEAD
SERVICE = web.AppKey("service", Service)


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={"Cache-Control": "no-cache"})


def allowed_origins(net: NetConfig, port: int) -> set[str]:
    """Browser Origins that may use the server: `allowed_origins` when set, else only its own page (http(s) on its
    host and the loopback names, at the port it listens on)."""
    if net.allowed_origins:
        return set(net.allowed_origins)
    hosts = {*LOOPBACK, f"[{net.host}]" if ":" in net.host else net.host}
    return {f"{scheme}://{host}:{port}" for scheme in ("http", "https") for host in hosts}


def _authorized(request: web.Request, token: str) -> bool:
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = given or auth[len("Bearer "):]
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def _guard(request: web.Request, service: Service) -> web.Response | None:
    """403 for a foreign Origin, 401 without the token; None when the request may proceed."""
    origin = request.headers.get("Origin")
    if origin is not None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname is None or origin not in allowed_origins(service.config.server, sockname[1]):
            return _text(403, "this Origin may not use the server")
    token = service.config.server.token
    if token and not _authorized(request, token):
        return _text(401, "missing or wrong token")
    return None


@web.middleware
async def _methods(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    """405 for methods a path does not take; no tracebacks or object addresses in any answer."""
    allowed = METHODS.get(request.path, ("GET", "HEAD"))
    if request.method not in allowed:
        response = _text(405, f"only {', '.join(allowed)}")
        response.headers["Allow"] = ", ".join(allowed)
        return response
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("HTTP request to %s failed", request.path[:200])
        return _text(500, "internal error; see the server log")


async def _messages(ws: web.WebSocketResponse) -> AsyncIterator[str | bytes]:
    async for message in ws:
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):  # ERROR: e.g. over max_msg_size (closed 1009)
            return
        yield message.data


async def _websocket(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    if service.connections >= service.config.limits.max_connections:
        return _text(503, "the server is at its connection limit")
    if (refused := _guard(request, service)) is not None:
        return refused
    ws = web.WebSocketResponse(max_msg_size=4 * service.config.limits.max_message_bytes, heartbeat=20.0)
    if not ws.can_prepare(request).ok:
        return _text(400, "expected a WebSocket upgrade")
    await ws.prepare(request)
    service.connections += 1

    async def send(item: str | bytes) -> None:
        await (ws.send_str(item) if isinstance(item, str) else ws.send_bytes(item))

    try:
        await Connection(service, send, request.remote or "?").run(_messages(ws))
    finally:
        service.connections -= 1
    return ws


async def _speech(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    if (refused := _guard(request, service)) is not None:
        code = "forbidden" if refused.status == 403 else "unauthorized"
        return openai_error(service, ProtocolError(code, refused.text.strip()))
    return await speech(request, service, request.remote or "?")


async def _models(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    if (refused := _guard(request, service)) is not None:
        return refused
    return web.json_response({"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                           "owned_by": "csm-jax"}]})


async def _health(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    return web.json_response({"status": "ok", "model": service.model_name, "active": service.scheduler.active},
                             headers={"Cache-Control": "no-cache"})


async def _metrics(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    if (refused := _guard(request, service)) is not None:
        return refused
    return web.Response(body=service.metrics.render(), headers={"Content-Type": service.metrics.content_type})


def _static(root: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    root = root.resolve()

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        if len(path) > MAX_PATH_CHARS:
            return _text(404, "not found")
        try:
            file = (root / (path.lstrip("/") or "index.html")).resolve()
            if not file.is_relative_to(root) or not file.is_file():
                return _text(404, "not found")
        except (OSError, ValueError):  # a segment over the file system's name limit, a NUL byte
            return _text(404, "not found")
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return web.Response(body=file.read_bytes(), headers={"Content-Type": ctype, "Cache-Control": "no-cache"})

    return handler


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[_methods], client_max_size=service.config.limits.max_body_bytes)
    app[SERVICE] = service
    for path, handler in ((WS_PATH, _websocket), (SPEECH_PATH, _speech), ("/v1/models", _models),
                          ("/health", _health), ("/metrics", _metrics)):
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/{tail:.*}", _static(service.config.static_dir))
    return app


async def start_http(service: Service) -> tuple[web.AppRunner, tuple[str, int]]:
    """Bind and serve; returns the runner (`await runner.cleanup()` stops it) and the bound (host, port)."""
    net = service.config.server
    runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, net.host, net.port)
    await site.start()
    address: Any = runner.addresses[0]
    return runner, (address[0], address[1])


def ready_line(model: str, address: tuple[str, int]) -> str:
    host, port = address
    shown = f"[{host}]" if ":" in host else host
    return (f"  web page:  http://{shown}:{port}/\n  websocket: ws://{shown}:{port}{WS_PATH}\n"
            f"  speech:    POST http://{shown}:{port}{SPEECH_PATH} (OpenAI-compatible)\n"
            f"  metrics:   http://{shown}:{port}/metrics  model: {json.dumps(model)}")
