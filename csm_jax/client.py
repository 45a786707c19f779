"""Python client for the csm-jax conversation server (WebSocket protocol v1, `docs/protocol.md`).

Library (asyncio)::

    from csm_jax.client import Client

    async with Client("ws://127.0.0.1:8765/ws", token=None) as c:
        conversation_id = await c.start()                   # or c.start(existing_id) to resume
        turn = await c.send_file("question.wav", speaker=1, transcript="How are you?")
        r = await c.say("I am fine, thanks.", speaker=0, max_audio_ms=4000, on_frame=play)  # voice="default"
        r.audio          # float32 [N] at 24 kHz; r.done is the server's response.done event
        await c.history()

Synchronous helpers (they also work inside a running event loop, e.g. a Jupyter notebook)::

    from csm_jax.client import say_to_wav
    r = say_to_wav("ws://127.0.0.1:8765/ws", "Hello there.", "hello.wav", speaker=0)

Command line::

    python -m csm_jax.client say --text "Hello there." --out hello.wav [--speaker 0] [--url URL] [--token T]
        [--conversation ID] [--max-audio-ms 4000] [--temperature 0.9] [--top-k 50] [--seed 0]
        [--voice NAME | --no-voice] [--json]
    python -m csm_jax.client send --wav question.wav --speaker 1 [--transcript "..."] [--conversation ID]
    python -m csm_jax.client history --conversation ID [--limit N] [--json]

`--url` defaults to $CSM_JAX_URL or ws://127.0.0.1:8765/ws, `--token` to $CSM_JAX_TOKEN. Exit status: 0 on
success, 1 on a server error event, a refused or failed connection, a timeout or an unreadable input file, 2 on
bad command-line usage.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import inspect
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

__all__ = ["DEFAULT_URL", "Client", "Response", "ServerError", "fetch_history", "main", "say_to_wav", "send_wav"]

log = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
PROTOCOL = 1
SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920

# error codes that answer binary audio chunks (which carry no id)
_CHUNK_ERRORS = frozenset({"no_audio_turn", "bad_audio", "audio_too_long"})

T = TypeVar("T")
FrameCallback = Callable[[np.ndarray], Awaitable[None] | None]


class ServerError(Exception):
    """An `error` event from the server: `code` (e.g. "bad_field", "busy") and `message`."""

    def __init__(self, code: str, message: str, event: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.event = event or {}


class ClientConnectionError(ConnectionError):
    """The WebSocket closed (or never became usable) while the client was waiting for the server."""


@dataclass
class Response:
    """One generated response: the audio, and the server's `response.done` event (`done`)."""

    audio: np.ndarray  # float32 [N], 24 kHz mono, in [-1, 1)
    frames: int  # binary frames received (each FRAME_SAMPLES samples)
    done: dict[str, Any]  # the response.done event (frames, audio_ms, ttfa_ms, rtf, stop_reason, turn_id, ...)
    ttfa_ms_client: float | None  # from sending `say` to receiving the first binary frame; None: no frame came
    response_id: str | None
    started: dict[str, Any] = field(default_factory=dict)  # the response.started event
    total_ms_client: float = 0.0  # from sending `say` to receiving response.done
    conversation_id: str | None = None
    sample_rate: int = SAMPLE_RATE

    @property
    def pcm16(self) -> np.ndarray:
        """The audio as int16 samples, exactly as the server sent them."""
        return np.round(self.audio * 32768.0).astype(np.int16)

    @property
    def stop_reason(self) -> str | None:
        return self.done.get("stop_reason")

    @property
    def audio_s(self) -> float:
        return len(self.audio) / self.sample_rate


class _Waiter:
    """The events (and, for a response, the binary frames) addressed to one pending client operation."""

    def __init__(self, accepts: set[str]):
        self.accepts = accepts  # event types this operation waits for (routing when an event carries no known id)
        self.queue: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()

    def put(self, kind: str, item: Any, t: float) -> None:
        self.queue.put_nowait((kind, item, t))


class Client:
    """One WebSocket connection to the server. Use as `async with Client(url, token) as c: ...`.

    `timeout` bounds every wait for the server (seconds between two events of the same operation; None: no
    limit): a stalled server raises TimeoutError instead of hanging. Operations on one connection are meant to
    run one at a time, except `cancel()`, which may be awaited from another task (or from `on_frame`) while
    `say()` is streaming.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float | None = 120.0,
                 open_timeout: float | None = 10.0, max_size: int | None = 64 * 1024 * 1024):
        self.url = url
        self.token = token
        self.timeout = timeout
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.ready: dict[str, Any] = {}
        self.session: dict[str, Any] = {}  # the last session.started event
        self.conversation_id: str | None = None
        self.unsolicited: list[dict[str, Any]] = []  # error events that answered no pending operation (last 100)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}  # request id -> waiter, in registration order
        self._response: _Waiter | None = None  # the say() whose response is streaming
        self._audio_turn: _Waiter | None = None  # the send_audio() whose chunks are being sent
        self._cancels: dict[int, _Waiter] = {}  # pending cancel() calls
        self._ignored: deque[int] = deque(maxlen=256)  # ids whose late answers (if any) are dropped
        self._draining: asyncio.Event | None = None  # set: no abandoned response is still streaming
        self._abandon_id: int | None = None  # the cancel sent for an abandoned response
        self._closed: BaseException | None = None
        self._last_done: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------- connection ---
    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def sample_rate(self) -> int:
        return int(self.ready.get("sample_rate", SAMPLE_RATE))

    @property
    def frame_samples(self) -> int:
        return int(self.ready.get("frame_samples", FRAME_SAMPLES))

    @property
    def limits(self) -> dict[str, Any]:
        return dict(self.ready.get("limits") or {})

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket and read the `ready` event (returned, and kept as `self.ready`)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                 max_size=self.max_size)
        try:
            raw = await asyncio.wait_for(self._ws.recv(), self.timeout)
        except ConnectionClosed as e:
            await self._ws.close()
            raise ClientConnectionError(f"the server closed the connection before `ready` ({_close_text(e)})") from e
        except BaseException:
            await self._ws.close()
            raise
        ready = _parse(raw)
        if ready is None or ready.get("type") != "ready":
            await self._ws.close()
            if ready is not None and ready.get("type") == "error":
                raise ServerError(str(ready.get("code")), str(ready.get("message")), ready)
            raise ClientConnectionError(f"expected a `ready` event first, got {str(raw)[:200]!r}")
        if ready.get("protocol") != PROTOCOL:
            log.warning("server speaks protocol %r; this client implements %d", ready.get("protocol"), PROTOCOL)
        self.ready = ready
        self._draining = asyncio.Event()
        self._draining.set()
        self._reader = asyncio.create_task(self._read_loop(), name="csm_jax.client reader")
        return ready

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        self._closed = self._closed or ClientConnectionError("the client closed the connection")

    # -------------------------------------------------------------------------------------- receiving ---
    async def _read_loop(self) -> None:
        assert self._ws is not None
        exc: BaseException
        try:
            async for msg in self._ws:
                t = time.perf_counter()
                if isinstance(msg, bytes):
                    self._on_binary(msg, t)
                else:
                    self._on_event(msg, t)
            code = self._ws.close_code
            exc = ClientConnectionError(f"the connection closed (code {code}: {self._ws.close_reason or '-'})")
        except ConnectionClosed as e:
            exc = ClientConnectionError(f"the connection closed ({_close_text(e)})")
        except Exception as e:  # noqa: BLE001 - a reader fault must reach the waiting operations
            log.exception("client reader failed")
            exc = ClientConnectionError(f"the client reader failed: {e!r}")
        self._closed = exc
        pending = [*self._waiters.values(), *self._cancels.values(), *([self._response] if self._response else [])]
        for w in {id(w): w for w in pending}.values():
            w.put("closed", exc, time.perf_counter())
        if self._draining is not None:
            self._draining.set()  # nothing streams any more

    def _on_binary(self, data: bytes, t: float) -> None:
        if self._response is not None:
            self._response.put("frame", data, t)
        elif self._draining is not None and not self._draining.is_set():
            pass  # a frame of an abandoned response
        else:
            log.debug("dropping a binary message (%d bytes) with no active response", len(data))

    def _on_event(self, raw: str, t: float) -> None:
        ev = _parse(raw)
        if ev is None:
            log.warning("ignoring a text message that is not a JSON object: %r", raw[:200])
            return
        typ = ev.get("type")
        eid = ev.get("id")
        if typ in ("response.started", "response.done"):
            if self._response is not None:
                self._response.put("event", ev, t)
            elif typ == "response.done" and self._draining is not None and not self._draining.is_set():
                self._draining.set()  # the abandoned response is over
            else:
                log.debug("ignoring %s with no active response", typ)
            return
        target: _Waiter | None
        if isinstance(eid, int | float | str):  # all requests of this client carry an id: it names the operation
            target = self._cancels.get(eid) or self._waiters.get(eid)
            if target is None and eid in self._ignored:
                self._ignored.remove(eid)
                if eid == self._abandon_id and typ == "error" and self._draining is not None:
                    self._draining.set()  # no_response: the abandoned say had not started (or had ended) after all
                return
            # target None: a late answer to an operation that has already returned (e.g. one that was interrupted)
        elif typ == "error" and ev.get("code") in _CHUNK_ERRORS:
            # answers a binary chunk: for the open audio turn, or a late one for a turn already refused/ended
            target = self._audio_turn
        elif typ == "error":
            target = self._audio_turn or self._response or next(iter(self._waiters.values()), None)
        else:
            target = next((w for w in self._waiters.values() if typ in w.accepts), None)
        if target is not None:
            target.put("event", ev, t)
            return
        if typ == "error":
            self.unsolicited = [*self.unsolicited[-99:], ev]
            log.info("server error that answers no pending request: %s: %s", ev.get("code"), ev.get("message"))
        else:
            log.debug("ignoring an unexpected %r event", typ)

    # -------------------------------------------------------------------------------------- requests ---
    def _check_open(self) -> None:
        if self._ws is None:
            raise ClientConnectionError("not connected: use `async with Client(url) as c:` or `await c.connect()`")
        if self._closed is not None:
            raise ClientConnectionError(str(self._closed))

    async def _send(self, event: dict[str, Any], waiter: _Waiter | None, registry: dict[int, _Waiter] | None = None
                    ) -> int:
        """Send `event` with a fresh id, registering `waiter` for the answers first (no answer can be missed)."""
        self._check_open()
        assert self._ws is not None
        rid = next(self._ids)
        if waiter is not None:
            (self._waiters if registry is None else registry)[rid] = waiter
        try:
            await self._ws.send(json.dumps({**event, "id": rid}))
        except ConnectionClosed as e:
            raise ClientConnectionError(f"the connection closed ({_close_text(e)})") from e
        return rid

    async def _next(self, waiter: _Waiter) -> tuple[str, Any, float]:
        try:
            kind, item, t = await asyncio.wait_for(waiter.queue.get(), self.timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer from the server within {self.timeout} s") from None
        if kind == "closed":
            raise ClientConnectionError(str(item))
        return kind, item, t

    async def _expect(self, waiter: _Waiter, typ: str) -> dict[str, Any]:
        """The next event for `waiter`; it must be `typ` (an error event raises ServerError)."""
        while True:
            kind, ev, _ = await self._next(waiter)
            if kind != "event":
                continue
            if ev.get("type") == "error":
                raise _server_error(ev)
            if ev.get("type") == typ:
                return ev
            log.debug("ignoring %r while waiting for %r", ev.get("type"), typ)

    async def _request(self, event: dict[str, Any], answer: str) -> dict[str, Any]:
        waiter = _Waiter({answer})
        rid = await self._send(event, waiter)
        try:
            return await self._expect(waiter, answer)
        finally:
            self._waiters.pop(rid, None)

    # ------------------------------------------------------------------------------------ operations ---
    async def start(self, conversation_id: str | None = None) -> str:
        """Start a new conversation (or resume `conversation_id`); return its id."""
        event: dict[str, Any] = {"type": "session.start"}
        if conversation_id is not None:
            event["conversation_id"] = conversation_id
        ev = await self._request(event, "session.started")
        self.session = ev
        self.conversation_id = ev.get("conversation_id")
        return str(self.conversation_id)

    async def say(self, text: str, speaker: int = 0, *, max_audio_ms: int | None = None,
                  temperature: float | None = None, top_k: int | None = None, seed: int | None = None,
                  depth_temperature: float | None = None, depth_top_k: int | None = None,
                  voice: str | Literal[False] | None = None, on_frame: FrameCallback | None = None) -> Response:
        """Generate `text` in `speaker`'s voice (sampling left out: the server's defaults). `voice`: a voice preset
        of the served model (`ready["voices"]`) that prompts the voice while the conversation has no audio of
        `speaker`, False for none (the context alone sets the voice), None for the server's default
        (`ready["defaults"]["voice"]`); `Response.started["voice"]` says which one was used. Frames are collected
        (and passed to `on_frame` as int16 [1920] arrays, in order, as they arrive); returns when the server's
        `response.done` arrives. A cancelled response returns normally with `stop_reason == "cancelled"`."""
        self._check_open()
        assert self._draining is not None
        if not self._draining.is_set():  # an abandoned response is still streaming: the server would say busy
            await asyncio.wait_for(self._draining.wait(), self.timeout)
            self._check_open()
        event: dict[str, Any] = {"type": "say", "text": text, "speaker": speaker}
        for key, value in (("max_audio_ms", max_audio_ms), ("temperature", temperature), ("top_k", top_k),
                           ("depth_temperature", depth_temperature), ("depth_top_k", depth_top_k), ("seed", seed)):
            if value is not None:
                event[key] = value
        if voice is not None:
            event["voice"] = None if voice is False else voice
        waiter = _Waiter({"response.started", "response.done"})
        owner = self._response is None
        if owner:
            self._response = waiter
        chunks: list[np.ndarray] = []
        started: dict[str, Any] = {}
        first: float | None = None
        finished = False
        rid = -1
        t0 = time.perf_counter()
        try:
            rid = await self._send(event, waiter)
            while True:
                kind, item, t = await self._next(waiter)
                if kind == "frame":
                    if first is None:
                        first = t
                    if len(item) % 2:
                        raise ClientConnectionError(f"the server sent an odd-length PCM16 frame ({len(item)} bytes)")
                    frame = np.frombuffer(item, dtype="<i2").astype(np.int16)
                    chunks.append(frame)
                    if on_frame is not None:
                        result = on_frame(frame)
                        if inspect.isawaitable(result):
                            await result
                    continue
                typ = item.get("type")
                if typ == "error":
                    finished = True  # the server refused it: nothing streams
                    raise _server_error(item)
                if typ == "response.started":
                    started = item
                elif typ == "response.done":
                    finished = True
                    self._last_done = item
                    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
                    resp = Response(audio=pcm.astype(np.float32) / 32768.0, frames=len(chunks), done=item,
                                    ttfa_ms_client=None if first is None else (first - t0) * 1000.0,
                                    response_id=item.get("response_id", started.get("response_id")),
                                    started=started, total_ms_client=(t - t0) * 1000.0,
                                    conversation_id=self.conversation_id, sample_rate=self.sample_rate)
                    for cw in self._cancels.values():
                        cw.put("done", item, t)
                    return resp
        finally:
            self._waiters.pop(rid, None)
            if owner:
                self._response = None
                if not finished and self._closed is None:
                    self._abandon()

    def _abandon(self) -> None:
        """say() was interrupted (task cancelled, timeout, on_frame raised) while the server streams: cancel it
        on the server and drop its remaining frames until its response.done."""
        assert self._draining is not None and self._ws is not None
        self._draining.clear()
        rid = self._abandon_id = next(self._ids)
        self._ignored.append(rid)

        async def send_cancel() -> None:
            try:
                assert self._ws is not None
                await self._ws.send(json.dumps({"type": "cancel", "id": rid}))
            except ConnectionClosed:
                pass

        asyncio.get_running_loop().create_task(send_cancel())

    async def cancel(self) -> dict[str, Any]:
        """Cancel the streaming response; return its response.done event (stop_reason "cancelled", or the
        natural one when it ended before the server saw the cancel). With nothing streaming the server answers
        `no_response`, raised as ServerError."""
        active = self._response is not None
        waiter = _Waiter(set())
        rid = await self._send({"type": "cancel"}, waiter, registry=self._cancels)
        try:
            while True:
                kind, item, _ = await self._next(waiter)
                if kind == "done":
                    self._ignored.append(rid)  # a no_response error may still come if the response had just ended
                    return item
                if item.get("type") == "error":
                    if item.get("code") == "no_response" and active and self._last_done is not None:
                        return self._last_done  # it ended by itself just before the cancel arrived
                    raise _server_error(item)
        finally:
            self._cancels.pop(rid, None)

    async def send_audio(self, audio: np.ndarray, sample_rate: int, speaker: int, transcript: str | None = None,
                         chunk_ms: int = 100) -> dict[str, Any]:
        """Send a user audio turn: `audio` float32 in [-1, 1] or int16, [N] (or [N, channels]: downmixed) at
        `sample_rate`, streamed as PCM16 chunks of `chunk_ms`; return the stored turn (a history turn object)."""
        pcm = _to_pcm16(audio)
        if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be > 0, got {chunk_ms}")
        chunk = max(1, int(sample_rate) * int(chunk_ms) // 1000)
        cap = int(self.limits.get("max_message_bytes") or 0)
        if cap >= 2:
            chunk = min(chunk, cap // 2)
        start: dict[str, Any] = {"type": "audio.start", "speaker": speaker, "sample_rate": int(sample_rate),
                                 "encoding": "pcm16", "channels": 1}
        if transcript is not None:
            start["transcript"] = transcript
        waiter = _Waiter({"audio.started", "turn.stored"})
        ids = [await self._send(start, waiter)]
        try:
            await self._expect(waiter, "audio.started")
            self._audio_turn = waiter
            assert self._ws is not None
            data = pcm.astype("<i2").tobytes()
            step = 2 * chunk
            for i in range(0, len(data), step):
                try:
                    await self._ws.send(data[i:i + step])
                except ConnectionClosed as e:
                    raise ClientConnectionError(f"the connection closed ({_close_text(e)})") from e
                if not waiter.queue.empty():  # the server refused the turn mid-stream (audio_too_long, bad_audio)
                    kind, ev, _ = waiter.queue.get_nowait()
                    if kind == "closed":
                        raise ClientConnectionError(str(ev))
                    if ev.get("type") == "error":
                        raise _server_error(ev)
            ids.append(await self._send({"type": "audio.end"}, waiter))
            ev = await self._expect(waiter, "turn.stored")
        finally:
            self._audio_turn = None
            for rid in ids:
                self._waiters.pop(rid, None)
        turn = dict(ev.get("turn") or {})
        turn.setdefault("frames", ev.get("frames"))
        return turn

    async def send_file(self, path: str | os.PathLike[str], speaker: int, transcript: str | None = None,
                        chunk_ms: int = 100) -> dict[str, Any]:
        """Send an audio file (anything soundfile reads: wav, flac, ogg, ...) as a user turn, downmixed to mono,
        as PCM16 at the file's own sample rate (the server resamples); return the stored turn."""
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return await self.send_audio(audio.mean(axis=1), int(sr), speaker, transcript=transcript, chunk_ms=chunk_ms)

    async def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The conversation's turns, oldest first (the most recent `limit` when given)."""
        event: dict[str, Any] = {"type": "history"}
        if limit is not None:
            event["limit"] = limit
        ev = await self._request(event, "history")
        return list(ev.get("turns") or [])


# -------------------------------------------------------------------------------------------- helpers ---
def _parse(raw: str | bytes) -> dict[str, Any] | None:
    try:
        ev = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return ev if isinstance(ev, dict) else None


def _server_error(ev: dict[str, Any]) -> ServerError:
    return ServerError(str(ev.get("code", "unknown")), str(ev.get("message", "")), ev)


def _close_text(e: ConnectionClosed) -> str:
    frame = e.rcvd or e.sent
    return f"code {frame.code}: {frame.reason or '-'}" if frame is not None else "no close frame"


def _to_pcm16(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim == 2:
        a = a.astype(np.float32) / (32768.0 if a.dtype == np.int16 else 1.0)
        a = a.mean(axis=1)
    if a.ndim != 1:
        raise ValueError(f"audio must be [N] or [N, channels], got shape {a.shape}")
    if a.dtype == np.int16:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be float (in [-1, 1]) or int16, got {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError("audio contains NaN or infinite samples")
    return np.clip(np.round(a.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)


def write_wav(path: str | os.PathLike[str], response: Response) -> None:
    """Write a response as a PCM16 mono wav at its sample rate (the exact samples the server sent)."""
    sf.write(str(path), response.pcm16, response.sample_rate, subtype="PCM_16")


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from a thread that already runs an event loop (Jupyter): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def say_to_wav(url: str, text: str, path: str | os.PathLike[str], speaker: int = 0, *, token: str | None = None,
               conversation_id: str | None = None, **say_kwargs: Any) -> Response:
    """Synchronous: connect, start (or resume `conversation_id`), say `text`, write the audio to `path` (24 kHz
    PCM16 wav); return the Response (`.conversation_id` is the conversation used)."""

    async def run() -> Response:
        async with Client(url, token) as c:
            await c.start(conversation_id)
            return await c.say(text, speaker, **say_kwargs)

    response = _run_sync(run())
    write_wav(path, response)
    return response


def send_wav(url: str, path: str | os.PathLike[str], speaker: int, *, transcript: str | None = None,
             token: str | None = None, conversation_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """Synchronous: send an audio file as a user turn; return (conversation id, stored turn)."""

    async def run() -> tuple[str, dict[str, Any]]:
        async with Client(url, token) as c:
            cid = await c.start(conversation_id)
            return cid, await c.send_file(path, speaker, transcript)

    return _run_sync(run())


def fetch_history(url: str, conversation_id: str, *, token: str | None = None, limit: int | None = None
                  ) -> list[dict[str, Any]]:
    """Synchronous: the turns of a stored conversation, oldest first."""

    async def run() -> list[dict[str, Any]]:
        async with Client(url, token) as c:
            await c.start(conversation_id)
            return await c.history(limit)

    return _run_sync(run())


# ------------------------------------------------------------------------------------------ command line ---
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("CSM_JAX_URL") or DEFAULT_URL,
                        help="server WebSocket URL (default: $CSM_JAX_URL or %(default)s)")
    common.add_argument("--token", default=os.environ.get("CSM_JAX_TOKEN") or None,
                        help="auth token, sent as a Bearer header (default: $CSM_JAX_TOKEN)")
    common.add_argument("--conversation", metavar="ID", help="resume this conversation (default: start a new one)")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each server event")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = argparse.ArgumentParser(prog="python -m csm_jax.client", description="Client for the csm-jax server.")
    sub = p.add_subparsers(dest="command", required=True)
    say = sub.add_parser("say", parents=[common], help="generate speech for a text; write it to a wav")
    say.add_argument("--text", required=True)
    say.add_argument("--speaker", type=int, default=0)
    say.add_argument("--out", required=True, help="output wav (24 kHz, PCM16)")
    say.add_argument("--max-audio-ms", type=int)
    say.add_argument("--temperature", type=float)
    say.add_argument("--top-k", type=int)
    say.add_argument("--depth-temperature", type=float, help="codebooks 1..K-1 (default: as --temperature)")
    say.add_argument("--depth-top-k", type=int, help="codebooks 1..K-1 (default: as --top-k)")
    say.add_argument("--seed", type=int)
    voice = say.add_mutually_exclusive_group()
    voice.add_argument("--voice", metavar="NAME", help="a voice preset of the served model (default: the server's)")
    voice.add_argument("--no-voice", action="store_true", help="no voice preset: the conversation sets the voice")
    send = sub.add_parser("send", parents=[common], help="send an audio file as a user turn")
    send.add_argument("--wav", required=True, help="any file soundfile reads (wav, flac, ogg); downmixed to mono")
    send.add_argument("--speaker", type=int, required=True)
    send.add_argument("--transcript")
    hist = sub.add_parser("history", parents=[common], help="print a conversation's turns")
    hist.add_argument("--limit", type=int, help="only the most recent N turns")
    return p


async def _cli(args: argparse.Namespace) -> dict[str, Any]:
    async with Client(args.url, args.token, timeout=args.timeout) as c:
        cid = await c.start(args.conversation)
        out: dict[str, Any] = {"conversation_id": cid, "resumed": bool(c.session.get("resumed"))}
        if args.command == "say":
            r = await c.say(args.text, args.speaker, max_audio_ms=args.max_audio_ms, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, depth_temperature=args.depth_temperature,
                            depth_top_k=args.depth_top_k, voice=False if args.no_voice else args.voice)
            write_wav(args.out, r)
            out.update(voice=r.started.get("voice"), done=r.done, frames_received=r.frames, audio_s=r.audio_s,
                       ttfa_ms_client=r.ttfa_ms_client, out=str(args.out))
        elif args.command == "send":
            out["turn"] = await c.send_file(args.wav, args.speaker, args.transcript)
        else:
            out["turns"] = await c.history(args.limit)
        return out


def _print_text(command: str, out: dict[str, Any]) -> None:
    print(f"conversation: {out['conversation_id']}" + (" (resumed)" if out["resumed"] else ""))
    if command == "say":
        d = out["done"]
        ttfa_c = out["ttfa_ms_client"]
        print(f"response {d.get('response_id')}: {d.get('frames')} frames, {d.get('audio_ms')} ms audio, "
              f"stop {d.get('stop_reason')}, turn {d.get('turn_id')}")
        print(f"ttfa {_fmt(d.get('ttfa_ms'))} ms (server), {_fmt(ttfa_c)} ms (client); rtf {_fmt(d.get('rtf'), 3)}; "
              f"voice preset {out['voice'] or '-'}")
        print(f"wrote {out['out']} ({out['audio_s']:.2f} s, 24 kHz PCM16)")
    elif command == "send":
        t = out["turn"]
        print(f"stored turn {t.get('turn_id')} (index {t.get('index')}): speaker {t.get('speaker')}, "
              f"{t.get('frames')} frames, text {t.get('text')!r}")
    else:
        turns = out["turns"]
        print(f"{len(turns)} turn(s)")
        for t in turns:
            print(f"  #{t.get('index')} turn {t.get('turn_id')} [{t.get('source')}] speaker {t.get('speaker')}: "
                  f"{t.get('frames')} frames, {t.get('created_at')}: {t.get('text')!r}")


def _fmt(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) else "-"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "history" and not args.conversation:
        print("error: history needs --conversation ID (a new conversation has no turns)", file=sys.stderr)
        return 2
    if args.command == "send" and not Path(args.wav).is_file():
        print(f"error: no such file: {args.wav}", file=sys.stderr)
        return 1

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 1

    try:
        out = asyncio.run(_cli(args))
    except ServerError as e:
        return fail(f"the server answered {e.code}: {e.message}")
    except InvalidStatus as e:
        status = e.response.status_code
        hint = {401: " (missing or wrong --token)", 403: " (origin not allowed)"}.get(status, "")
        return fail(f"the server refused the WebSocket handshake at {args.url}: HTTP {status}{hint}")
    except InvalidURI as e:
        return fail(f"bad URL {args.url!r}: {e}")
    except InvalidHandshake as e:
        return fail(f"WebSocket handshake with {args.url} failed: {e}")
    except ClientConnectionError as e:
        return fail(f"{args.url}: {e}")
    except TimeoutError as e:
        return fail(f"{args.url}: timed out ({e or 'no answer'})")
    except sf.LibsndfileError as e:
        return fail(f"cannot read {getattr(args, 'wav', '?')}: {e}")
    except OSError as e:  # connection refused, unknown host, unwritable --out
        if isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower():
            return fail(f"cannot connect to {args.url}: connection refused (is the server running?)")
        return fail(f"{args.url}: {e.strerror or e}")
    except ValueError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps(out))
    else:
        _print_text(args.command, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
