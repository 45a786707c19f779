"""The conversation server: WebSocket protocol v1 (docs/protocol.md) plus the web client over HTTP, one port.

Each connection has one outbox drained by its own sender task, so a slow client only delays itself; generation
runs on the scheduler's engine thread, audio decoding and database writes in worker threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import mimetypes
import numbers
import secrets
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from csm_jax.audio.processor import AudioError, AudioTooLong
from csm_jax.conversation import ContextFull, ConversationManager, UnknownConversation
from csm_jax.csm.generator import FRAME_MS, Generator
from csm_jax.serving.audio_turn import ENCODINGS, AudioTurn
from csm_jax.serving.config import NetConfig, ServeConfig
from csm_jax.serving.scheduler import Request, Result, Scheduler

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
WS_PATH = "/ws"


class ProtocolError(Exception):
    """Answered with an `error` event; the connection stays open."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclasses.dataclass
class Service:
    """What all connections share: the model, the engine loop, the conversation store, the config."""

    config: ServeConfig
    generator: Generator
    scheduler: Scheduler
    manager: ConversationManager
    model_name: str
    connections: int = 0  # open WebSockets (event-loop thread only)

    def ready_event(self) -> dict[str, Any]:
        lim = self.config.limits
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "sample_rate": self.generator.codec.sample_rate,
                "frame_samples": self.generator.codec.frame_size, "num_codebooks": self.generator.num_codebooks,
                "model": self.model_name, "limits": dataclasses.asdict(lim),
                "defaults": dataclasses.asdict(self.config.generation)}


# field validation ------------------------------------------------------------------------------------------
def _int(msg: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(name, default)
    if value is None:
        raise ProtocolError("bad_field", f"missing field {name!r} (int in {lo}..{hi})")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError("bad_field", f"field {name!r} must be an int in {lo}..{hi}, got {value!r}")
    return value


def _float(msg: dict[str, Any], name: str, default: float) -> float:
    value = msg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ProtocolError("bad_field", f"field {name!r} must be a finite number > 0, got {value!r}")
    return float(value)


MAX_ID_CHARS = 256


def _valid_id(value: Any) -> bool:
    """Event ids the server echoes: short strings, ints of at most 64 bits, finite floats."""
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS and _is_unicode(value)
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and -(2**63) <= value < 2**63) or (isinstance(value, float) and math.isfinite(value))


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800") decode from JSON but are not text
        return False
    return True


def _str(msg: dict[str, Any], name: str, max_chars: int, default: str | None = None) -> str:
    value = msg.get(name, default)
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"field {name!r} must be a string, got {type(value).__name__}")
    if not _is_unicode(value):
        raise ProtocolError("bad_field", f"field {name!r} is not valid Unicode (it has a lone surrogate)")
    if len(value) > max_chars:
        raise ProtocolError("text_too_long", f"field {name!r} has {len(value)} characters, over the limit of "
                                             f"{max_chars}")
    return value


class Connection:
    """One client: parses events, runs at most one response and one audio turn at a time."""

    def __init__(self, service: Service, ws: ServerConnection):
        self.service, self.ws = service, ws
        self.limits = service.config.limits
        self.outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.conversation_id: str | None = None
        self.request: Request | None = None
        self.request_meta: dict[str, Any] = {}
        self.audio_turn: AudioTurn | None = None
        self.audio_meta: dict[str, Any] = {}
        self.requests = 0
        self.responses = 0
        self.conversations = 0
        self.tokens, self.refilled = float(self.limits.message_burst), time.monotonic()  # message token bucket
        self.closed = False

    # io ----------------------------------------------------------------------------------------------------
    def send(self, event: dict[str, Any], reply_to: Any = None) -> None:
        """Queue `event`, echoing the `id` of `reply_to` (the event it answers) when that is a valid id."""
        if isinstance(reply_to, dict) and _valid_id(reply_to.get("id")):
            event = {**event, "id": reply_to["id"]}
        self.outbox.put_nowait(json.dumps(event))

    def error(self, code: str, message: str, reply_to: dict[str, Any] | None = None) -> None:
        self.send({"type": "error", "code": code, "message": message}, reply_to)

    async def _sender(self) -> None:
        while (item := await self.outbox.get()) is not None:
            try:
                await self.ws.send(item)
            except ConnectionClosed:
                return

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        self.send(self.service.ready_event())
        try:
            async for message in self.ws:
                await self.dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            if self.request is not None:
                self.request.cancel()
            self.audio_turn = None
            self.outbox.put_nowait(None)
            await sender

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.limits.message_burst),
                          self.tokens + (now - self.refilled) * self.limits.messages_per_s)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    async def dispatch(self, message: str | bytes) -> None:
        msg: dict[str, Any] | None = None
        try:
            if not self._take_token():
                raise ProtocolError("rate_limited", f"over {self.limits.messages_per_s:g} messages/s (burst "
                                                    f"{self.limits.message_burst}); the message was dropped")
            size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "surrogatepass"))
            if size > self.limits.max_message_bytes:
                raise ProtocolError("too_large", f"message of {size} bytes is over the limit of "
                                                 f"{self.limits.max_message_bytes}; it was dropped")
            if isinstance(message, bytes):
                await self.on_audio_chunk(message)
                return
            try:
                parsed = json.loads(message)
            except json.JSONDecodeError as e:
                raise ProtocolError("bad_json", f"not valid JSON: {e}") from None
            except (RecursionError, ValueError) as e:  # nesting too deep, an integer with too many digits
                raise ProtocolError("bad_json", f"JSON the server does not accept: {type(e).__name__}") from None
            if not isinstance(parsed, dict):
                raise ProtocolError("bad_json", f"an event must be a JSON object, got {type(parsed).__name__}")
            if "id" in parsed and not _valid_id(parsed["id"]):
                raise ProtocolError("bad_field", f"field 'id' must be a string of at most {MAX_ID_CHARS} "
                                                 "characters or a number")
            msg = parsed
            kind = msg.get("type")
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ProtocolError("unknown_type", f"unknown event type {kind!r}; known: {sorted(self.HANDLERS)}")
            await handler(self, msg)
        except ProtocolError as e:
            self.error(e.code, e.message, msg)
        except Exception as e:  # a server fault must not take the connection down
            log.exception("event failed")
            self.error("internal", f"the server failed on this event ({type(e).__name__}); see its log", msg)

    # handlers ----------------------------------------------------------------------------------------------
    def _need_session(self) -> str:
        if self.conversation_id is None:
            raise ProtocolError("no_session", "send session.start first")
        return self.conversation_id

    def _count_request(self) -> None:
        if self.requests >= self.limits.max_requests:
            raise ProtocolError("rate_limited", f"this connection used its {self.limits.max_requests} requests")
        self.requests += 1

    async def on_session_start(self, msg: dict[str, Any]) -> None:
        cid = None if msg.get("conversation_id") is None else _str(msg, "conversation_id", MAX_ID_CHARS)
        if self.request is not None or self.audio_turn is not None:
            raise ProtocolError("busy", "finish or cancel the current response / audio turn first")
        manager = self.service.manager
        if cid is None:
            if self.conversations >= self.limits.max_conversations:
                raise ProtocolError("rate_limited", f"this connection created its {self.limits.max_conversations} "
                                                    "conversations")
            self.conversations += 1
        try:
            cid, resumed = await asyncio.to_thread(manager.start, cid)
        except UnknownConversation:
            raise ProtocolError("unknown_conversation", f"no conversation with id {cid!r}") from None
        turns = len(await asyncio.to_thread(manager.history, cid))
        self.conversation_id = cid
        self.send({"type": "session.started", "conversation_id": cid, "resumed": resumed, "turns": turns}, msg)

    async def on_say(self, msg: dict[str, Any]) -> None:
        cid = self._need_session()
        if self.request is not None or self.audio_turn is not None:
            raise ProtocolError("busy", "a response or an audio turn is already in progress")
        gen, defaults = self.service.generator, self.service.config.generation
        text = _str(msg, "text", self.limits.max_text_chars)
        if not text.strip():
            raise ProtocolError("bad_field", "field 'text' must not be empty")
        speaker = _int(msg, "speaker", 0, 2**31 - 1)
        max_ms = _int(msg, "max_audio_ms", FRAME_MS, self.limits.max_audio_ms,
                      min(defaults.max_audio_ms, self.limits.max_audio_ms))
        temperature = _float(msg, "temperature", defaults.temperature)
        top_k = _int(msg, "top_k", 1, gen.cfg.audio_vocab_size, defaults.top_k)
        seed = _int(msg, "seed", 0, 2**32 - 1, secrets.randbelow(2**31))
        if self.service.scheduler.queued >= self.limits.max_queued:
            raise ProtocolError("overloaded", f"{self.service.scheduler.queued} responses are waiting for the "
                                              "engine; try again shortly")
        self._count_request()
        max_frames = max_ms // FRAME_MS
        try:
            prompt = await asyncio.to_thread(self.service.manager.build_prompt, cid, text, speaker, max_frames)
        except ContextFull as e:
            raise ProtocolError("context_full", str(e)) from None
        self.responses += 1
        response_id = f"r-{self.responses}"
        meta = {"response_id": response_id, "text": text, "speaker": speaker, "reply_to": msg}
        request = Request(prompt.tokens, prompt.mask, max_frames, temperature, top_k, seed,
                          on_frame=self._frame_from_engine, on_done=self._done_from_engine)
        self.request, self.request_meta = request, meta
        self.send({"type": "response.started", "response_id": response_id, "context_turns": prompt.context_turns,
                   "prompt_rows": prompt.rows}, msg)
        self.service.scheduler.submit(request)

    def _frame_from_engine(self, pcm: np.ndarray) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, pcm.tobytes())

    def _done_from_engine(self, result: Result) -> None:  # engine thread
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._finish_response(result)))

    async def _finish_response(self, result: Result) -> None:
        meta = self.request_meta
        turn_id = None
        try:
            if result.stop_reason in ("eos", "max_length") and result.frames and not self.closed:
                turn = await asyncio.to_thread(self.service.manager.add_turn, self.conversation_id, meta["speaker"],
                                               meta["text"], result.codes, "generated")
                turn_id = turn.turn_id
        except Exception as e:  # storage failed: the client must hear that the turn was not kept
            log.exception("storing a generated turn failed")
            self.error("storage_failed", f"the response was generated but could not be stored "
                                         f"({type(e).__name__}); it is not part of the conversation", meta["reply_to"])
            return
        finally:
            self.request, self.request_meta = None, {}
        if result.stop_reason == "error":
            log.error("generation failed: %s", result.error)
            self.error("internal", "generation failed; see the server log", meta["reply_to"])
            return
        audio_ms = result.frames * FRAME_MS
        elapsed = result.finished - result.started
        ttfa = None if result.first_frame is None else round((result.first_frame - result.started) * 1e3, 1)
        self.send({"type": "response.done", "response_id": meta["response_id"], "frames": result.frames,
                   "audio_ms": audio_ms, "ttfa_ms": ttfa,
                   "rtf": round(elapsed / (audio_ms / 1e3), 4) if audio_ms else None,
                   "stop_reason": result.stop_reason, "turn_id": turn_id}, meta["reply_to"])

    async def on_cancel(self, msg: dict[str, Any]) -> None:
        if self.request is None:
            raise ProtocolError("no_response", "no response is in progress")
        wanted = msg.get("response_id")
        if wanted is not None and wanted != self.request_meta.get("response_id"):
            raise ProtocolError("no_response", f"response {wanted!r} is not in progress; nothing was cancelled")
        self.request.cancel()

    async def on_audio_start(self, msg: dict[str, Any]) -> None:
        self._need_session()
        if self.request is not None or self.audio_turn is not None:
            raise ProtocolError("busy", "a response or an audio turn is already in progress")
        speaker = _int(msg, "speaker", 0, 2**31 - 1)
        rate = _int(msg, "sample_rate", 1000, 384_000, 24_000 if msg.get("encoding") == "file" else None)
        encoding = msg.get("encoding", "pcm16")
        if encoding not in ENCODINGS:
            raise ProtocolError("bad_field", f"field 'encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
        channels = _int(msg, "channels", 1, 32, 1)
        transcript = _str(msg, "transcript", self.limits.max_text_chars, "")
        self._count_request()
        gen = self.service.generator
        self.audio_turn = AudioTurn(gen.codec, gen.cfg.num_codebooks, speaker=speaker, sample_rate=rate,
                                    encoding=encoding, channels=channels, transcript=transcript,
                                    max_seconds=self.limits.max_audio_s)
        self.send({"type": "audio.started", "speaker": speaker}, msg)

    async def on_audio_chunk(self, data: bytes) -> None:
        turn = self.audio_turn
        if turn is None:
            raise ProtocolError("no_audio_turn", "binary audio needs an open audio turn (send audio.start first)")
        try:
            await asyncio.to_thread(turn.push, data)
        except AudioError as e:
            self.audio_turn = None
            code = "audio_too_long" if isinstance(e, AudioTooLong) else "bad_audio"
            raise ProtocolError(code, f"{e}; the audio turn was discarded") from None

    async def on_audio_end(self, msg: dict[str, Any]) -> None:
        turn = self.audio_turn
        if turn is None:
            raise ProtocolError("no_audio_turn", "no audio turn is open (send audio.start first)")
        transcript = _str(msg, "transcript", self.limits.max_text_chars, turn.transcript)
        self.audio_turn = None
        try:
            codes = await asyncio.to_thread(turn.finish)
        except AudioError as e:
            code = "audio_too_long" if isinstance(e, AudioTooLong) else "bad_audio"
            raise ProtocolError(code, f"{e}; the audio turn was discarded") from None
        stored = await asyncio.to_thread(self.service.manager.add_turn, self._need_session(), turn.speaker,
                                         transcript, codes, "user")
        self.send({"type": "turn.stored", "turn": stored.summary(), "frames": stored.frames}, msg)

    async def on_history(self, msg: dict[str, Any]) -> None:
        cid = self._need_session()
        limit = None if msg.get("limit") is None else _int(msg, "limit", 1, 1_000_000)
        turns = await asyncio.to_thread(self.service.manager.history, cid, limit)
        self.send({"type": "history", "conversation_id": cid, "turns": [t.summary() for t in turns]}, msg)

    HANDLERS = {
        "session.start": on_session_start,
        "say": on_say,
        "cancel": on_cancel,
        "audio.start": on_audio_start,
        "audio.end": on_audio_end,
        "history": on_history,
    }


# HTTP side -------------------------------------------------------------------------------------------------
def _http(status: HTTPStatus, body: bytes, content_type: str) -> HttpResponse:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return HttpResponse(status.value, status.phrase, headers, body)


def _authorized(request: HttpRequest, token: str) -> bool:
    query = parse_qs(urlsplit(request.path).query)
    given = query.get("token", [""])[0]
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = given or auth[len("Bearer "):]
    return hmac.compare_digest(given.encode(), token.encode())


MAX_PATH_CHARS = 1024


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def allowed_origins(net: NetConfig, local_address: Any) -> set[str]:
    """Browser Origins that may open the WebSocket: `allowed_origins` when set, else only the server's own page
    (http(s) on its host and the loopback names, at the port it listens on), so a foreign page cannot drive it."""
    if net.allowed_origins:
        return set(net.allowed_origins)
    port = local_address[1]
    hosts = {*LOOPBACK, f"[{net.host}]" if ":" in net.host else net.host}
    return {f"{scheme}://{host}:{port}" for scheme in ("http", "https") for host in hosts}


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def resolve_token(net: NetConfig) -> NetConfig:
    """`token_file` read into `token`; refuses a public bind without a token unless explicitly allowed."""
    if net.token_file:
        try:
            token = Path(net.token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"server.token_file: cannot read {net.token_file}: {e}") from None
        if not token:
            raise ValueError(f"server.token_file: {net.token_file} is empty")
        net = dataclasses.replace(net, token=token)
    if not net.token and not is_loopback(net.host):
        if not net.allow_public_without_token:
            raise ValueError(f"refusing to listen on {net.host} without a token: anyone who can reach it could use "
                             "the model and read every conversation. Set CSM_JAX_TOKEN or server.token_file, or "
                             "server.allow_public_without_token=true")
        log.warning("listening on %s WITHOUT a token: anyone who can reach this port can use the server", net.host)
    return net


def make_process_request(service: Service, static_dir: Path):
    """HTTP routing before the WebSocket handshake: `/ws` (auth checked), `/health`, and the static web client."""
    root = static_dir.resolve()

    def process_request(connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        if request.method not in ("GET", "HEAD"):
            response = _http(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", "text/plain; charset=utf-8")
            response.headers["Allow"] = "GET, HEAD"
            return response
        response = route(connection, request)
        if response is not None and request.method == "HEAD":
            response.body = b""  # same headers (Content-Length of the GET body), no body
        return response

    def route(connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            if service.connections >= service.config.limits.max_connections:
                return _http(HTTPStatus.SERVICE_UNAVAILABLE, b"the server is at its connection limit\n",
                             "text/plain; charset=utf-8")
            origin = request.headers.get("Origin")
            allowed = allowed_origins(service.config.server, connection.local_address)
            if origin is not None and origin not in allowed:
                return _http(HTTPStatus.FORBIDDEN, b"this Origin may not connect\n", "text/plain; charset=utf-8")
            token = service.config.server.token
            if token and not _authorized(request, token):
                return _http(HTTPStatus.UNAUTHORIZED, b"missing or wrong token\n", "text/plain; charset=utf-8")
            return None
        if path == "/health":
            body = json.dumps({"status": "ok", "model": service.model_name, "active": service.scheduler.active})
            return _http(HTTPStatus.OK, body.encode(), "application/json")
        not_found = _http(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        if len(path) > MAX_PATH_CHARS:
            return not_found
        try:
            file = (root / (path.lstrip("/") or "index.html")).resolve()
            if not file.is_relative_to(root) or not file.is_file():
                return not_found
        except (OSError, ValueError):  # a segment over the file system's name limit, a NUL byte
            return not_found
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
            ctype += "; charset=utf-8"
        return _http(HTTPStatus.OK, file.read_bytes(), ctype)

    return process_request


async def start_server(service: Service) -> Server:
    """Bind and start serving (returns once listening)."""
    cfg = service.config

    async def handler(ws: ServerConnection) -> None:
        service.connections += 1
        try:
            await Connection(service, ws).run()
        finally:
            service.connections -= 1

    return await serve(handler, cfg.server.host, cfg.server.port,
                       process_request=make_process_request(service, cfg.static_dir),
                       max_size=4 * cfg.limits.max_message_bytes, max_queue=64)


def build_service(config: ServeConfig) -> Service:
    """Load the model (or build the default one), open the store, start the engine thread after warmup."""
    from csm_jax.conversation import SQLiteStore
    from csm_jax.csm.generator import load_csm
    from csm_jax.default_model import NAME, default_generator

    if config.engine.compile_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(config.engine.compile_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    m = config.model
    if m.path is None:
        generator, name = default_generator(m.seed), NAME
        if m.num_codebooks is not None:
            generator = Generator(generator.params, generator.cfg, generator.codec, generator.tokenizer,
                                  m.num_codebooks, frontend=generator.prompt_format().frontend)
    else:
        generator = load_csm(m.path, codec=m.codec, num_codebooks=m.num_codebooks, dtype=m.dtype)
        name = Path(m.path).name
    if generator.tokenizer is None or generator.codec is None:
        raise ValueError(f"{m.path}: the server needs a checkpoint with tokenizer.json and a codec "
                         "(pass model.codec=...)")
    if config.storage.backend != "sqlite":
        raise ValueError(f"unknown storage backend {config.storage.backend!r}; supported: ['sqlite']")
    store = SQLiteStore(config.storage.path)
    manager = ConversationManager(store, generator.prompt_format().with_context(config.context.max_turns),
                                  generator.cfg.backbone.max_seq_len)
    scheduler = Scheduler(generator, config.engine.batch_size)
    if config.engine.warmup_rows:
        t = scheduler.warmup(config.engine.warmup_rows)
        log.info("warmup (compilation) took %.1f s", t)
    scheduler.start()
    return Service(config, generator, scheduler, manager, name)


async def serve_forever(config: ServeConfig) -> None:
    t0 = time.perf_counter()
    config = dataclasses.replace(config, server=resolve_token(config.server))  # before the (slow) model load
    service = await asyncio.to_thread(build_service, config)
    server = await start_server(service)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"csm-jax server ready in {time.perf_counter() - t0:.1f} s on the model {service.model_name!r}\n"
          f"  web page:  http://{host}:{port}/\n  websocket: ws://{host}:{port}{WS_PATH}", flush=True)
    try:
        await server.serve_forever()
    finally:
        service.scheduler.stop()
