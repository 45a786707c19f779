"""WebSocket protocol v1 (docs/protocol.md): one `Connection` per client, independent of the transport.

Each connection has one outbox drained by its own sender task, so a slow client only delays itself; generation
runs on the scheduler's engine thread, audio decoding and database writes in worker threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import numpy as np

from csm_jax.audio.processor import SAMPLE_RATE, AudioError, AudioTooLong
from csm_jax.conversation import StoreError, UnknownConversation
from csm_jax.dialogue.transcriber import TranscriptionError
from csm_jax.serving.audio_turn import ENCODINGS, AudioTurn
from csm_jax.serving.fields import MAX_ID_CHARS, ProtocolError, int_field, parse_object, str_field, valid_id
from csm_jax.serving.scheduler import Request, Result
from csm_jax.serving.service import Service, SpeechParams
from csm_jax.serving.talk import Talk

log = logging.getLogger(__name__)

Send = Callable[[str | bytes], Awaitable[None]]


class Connection:
    """One client: parses events, runs at most one response and one audio turn at a time.
    `send` writes one message to the client (raising ConnectionError once it is gone); `client` is its address."""

    def __init__(self, service: Service, send: Send, client: str):
        self.service, self._send, self.client = service, send, client
        self.limits = service.config.limits
        self.outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.conversation_id: str | None = None
        self.request: Request | None = None
        self.request_meta: dict[str, Any] = {}
        self.audio_turn: AudioTurn | None = None
        self.talk: Talk | None = None
        self.responses = 0
        self.conversations = 0
        self.tokens, self.refilled = float(self.limits.message_burst), time.monotonic()  # message token bucket
        self.closed = False

    # io ----------------------------------------------------------------------------------------------------
    def send(self, event: dict[str, Any], reply_to: Any = None) -> None:
        """Queue `event`, echoing the `id` of `reply_to` (the event it answers) when that is a valid id."""
        if isinstance(reply_to, dict) and valid_id(reply_to.get("id")):
            event = {**event, "id": reply_to["id"]}
        self.outbox.put_nowait(json.dumps(event))

    def error(self, code: str, message: str, reply_to: dict[str, Any] | None = None) -> None:
        self.service.error(code)
        self.send({"type": "error", "code": code, "message": message}, reply_to)

    async def _sender(self) -> None:
        while (item := await self.outbox.get()) is not None:
            try:
                await self._send(item)
            except (ConnectionError, RuntimeError):  # the client is gone
                return

    async def run(self, messages: AsyncIterator[str | bytes]) -> None:
        """Serve the client until `messages` ends (it closed the connection)."""
        sender = asyncio.create_task(self._sender())
        self.send(self.service.ready_event())
        try:
            async for message in messages:
                await self.dispatch(message)
        finally:
            self.closed = True
            if self.talk is not None:
                self.talk.close()
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
                await (self.talk.push(message) if self.talk is not None else self.on_audio_chunk(message))
                return
            parsed = parse_object(message)
            if "id" in parsed and not valid_id(parsed["id"]):
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
        except StoreError as e:  # the database is lost (or failed): this event stored nothing; the connection goes on
            log.error("conversation store: %s", e)
            self.error("storage_unavailable", "the conversation store cannot be used right now; nothing was "
                                              "stored (try again shortly; the server log has the details)", msg)
        except Exception as e:  # a server fault must not take the connection down
            log.exception("event failed")
            self.error("internal", f"the server failed on this event ({type(e).__name__}); see its log", msg)

    # handlers ----------------------------------------------------------------------------------------------
    def _need_session(self) -> str:
        if self.conversation_id is None:
            raise ProtocolError("no_session", "send session.start first")
        return self.conversation_id

    def _need_idle(self) -> None:
        if self.request is not None or self.audio_turn is not None:
            raise ProtocolError("busy", "a response or an audio turn is already in progress; finish or cancel it")
        if self.talk is not None:
            raise ProtocolError("busy", "talk mode is on (send talk.stop first)")

    async def on_session_start(self, msg: dict[str, Any]) -> None:
        cid = None if msg.get("conversation_id") is None else str_field(msg, "conversation_id", MAX_ID_CHARS)
        self._need_idle()
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
        self._need_idle()
        service = self.service
        params = service.speech_params(msg, "text", int_field(msg, "speaker", 0, 2**31 - 1))
        service.check_queue()
        service.charge(self.client)
        await self._respond(cid, params, msg)

    async def _respond(self, cid: str, params: SpeechParams, reply_to: dict[str, Any] | None,
                       extra: dict[str, Any] | None = None) -> asyncio.Future[Result]:
        """Start a response (`response.started`, frames, `response.done`); -> a future of its Result."""
        service = self.service
        prompt = await service.prompt(cid, params)
        if self.request is not None:
            raise ProtocolError("busy", "a response is already in progress")
        self.responses += 1
        response_id = f"r-{self.responses}"
        future: asyncio.Future[Result] = self.loop.create_future()
        self.request_meta = {"response_id": response_id, "params": params, "reply_to": reply_to,
                             "log_id": service.next_id("ws"), "extra": extra or {}, "future": future}
        self.send({"type": "response.started", "response_id": response_id, "context_turns": prompt.context_turns,
                   "prompt_rows": prompt.rows, "voice": params.voice if prompt.voice_turns else None, **(extra or {})},
                  reply_to)
        self.request = service.submit(prompt, params, self._frame_from_engine, self._done_from_engine)
        return future

    async def speak(self, params: SpeechParams, extra: dict[str, Any]) -> Result:
        """A response the server starts itself (a talk-mode reply sentence); returns when it has ended."""
        self.service.check_queue()
        future = await self._respond(self._need_session(), params, None, extra)
        return await asyncio.shield(future)  # a cancelled caller (barge-in) leaves the response to finish

    def interrupt_response(self) -> asyncio.Future[Result] | None:
        """Stop the response in progress at its next frame, keeping what was sent; -> its future."""
        if self.request is None:
            return None
        self.request_meta["interrupted"] = True
        self.request.cancel()
        return self.request_meta["future"]

    def _frame_from_engine(self, pcm: np.ndarray) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, pcm.tobytes())

    def _done_from_engine(self, result: Result) -> None:  # engine thread
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._finish_response(result)))

    async def _finish_response(self, result: Result) -> None:
        meta, service = self.request_meta, self.service
        params = meta["params"]
        turn_id = None
        if result.stop_reason == "cancelled" and meta.get("interrupted"):
            result = dataclasses.replace(result, stop_reason="interrupted")  # barge-in: keep what was sent
        try:
            if result.stop_reason in ("eos", "max_length", "interrupted") and result.frames and not self.closed:
                turn = await asyncio.to_thread(service.manager.add_turn, self.conversation_id, params.speaker,
                                               params.text, result.codes, "generated")
                turn_id = turn.turn_id
        except Exception as e:  # storage failed: the client must hear that the turn was not kept
            log.exception("storing a generated turn failed")
            self.error("storage_failed", f"the response was generated but could not be stored "
                                         f"({type(e).__name__}); it is not part of the conversation", meta["reply_to"])
            return
        finally:
            self.request, self.request_meta = None, {}
            if not meta["future"].done():
                meta["future"].set_result(result)
        summary = service.finished("ws", meta["log_id"], result, self.client, conversation=self.conversation_id)
        if result.stop_reason == "error":
            log.error("generation failed: %s", result.error)
            self.error("internal", "generation failed; see the server log", meta["reply_to"])
            return
        self.send({"type": "response.done", "response_id": meta["response_id"], **summary, "turn_id": turn_id,
                   **meta["extra"]}, meta["reply_to"])

    async def on_cancel(self, msg: dict[str, Any]) -> None:
        if self.request is None:
            raise ProtocolError("no_response", "no response is in progress")
        wanted = msg.get("response_id")
        if wanted is not None and wanted != self.request_meta.get("response_id"):
            raise ProtocolError("no_response", f"response {wanted!r} is not in progress; nothing was cancelled")
        self.request.cancel()

    async def on_audio_start(self, msg: dict[str, Any]) -> None:
        self._need_session()
        self._need_idle()
        speaker = int_field(msg, "speaker", 0, 2**31 - 1)
        rate = int_field(msg, "sample_rate", 1000, 384_000, 24_000 if msg.get("encoding") == "file" else None)
        encoding = msg.get("encoding", "pcm16")
        if encoding not in ENCODINGS:
            raise ProtocolError("bad_field", f"field 'encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
        channels = int_field(msg, "channels", 1, 32, 1)
        transcript = str_field(msg, "transcript", self.limits.max_text_chars, "")
        self.service.charge(self.client)
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
        transcript = str_field(msg, "transcript", self.limits.max_text_chars, turn.transcript)
        self.audio_turn = None
        try:
            codes = await asyncio.to_thread(turn.finish)
        except AudioError as e:
            code = "audio_too_long" if isinstance(e, AudioTooLong) else "bad_audio"
            raise ProtocolError(code, f"{e}; the audio turn was discarded") from None
        transcribed = False
        if not transcript.strip() and self.service.transcriber is not None:
            try:
                transcript = await asyncio.to_thread(self.service.transcriber.transcribe, turn.audio, SAMPLE_RATE)
                transcribed = True
            except TranscriptionError as e:  # the turn is kept, as audio only
                log.warning("transcription failed: %s", e)
                self.error("transcription_failed", f"{e}; the turn is stored without a transcript", msg)
        stored = await asyncio.to_thread(self.service.manager.add_turn, self._need_session(), turn.speaker,
                                         transcript, codes, "user")
        self.send({"type": "turn.stored", "turn": stored.summary(), "frames": stored.frames,
                   "transcribed": transcribed}, msg)

    async def on_audio_cancel(self, msg: dict[str, Any]) -> None:
        if self.audio_turn is None:
            raise ProtocolError("no_audio_turn", "no audio turn is open; nothing was cancelled")
        self.audio_turn = None
        self.send({"type": "audio.cancelled"}, msg)

    async def on_talk_start(self, msg: dict[str, Any]) -> None:
        self._need_session()
        self._need_idle()
        service = self.service
        if not service.config.turn_taking.vad:
            raise ProtocolError("bad_field", "talk mode is off on this server (turn_taking.vad=false)")
        speaker = int_field(msg, "speaker", 0, 2**31 - 1)
        reply_speaker = int_field(msg, "reply_speaker", 0, 2**31 - 1, 0)
        rate = int_field(msg, "sample_rate", 8000, 192_000)
        encoding = msg.get("encoding", "pcm16")
        if encoding not in ("pcm16", "float32"):
            raise ProtocolError("bad_field", f"field 'encoding' must be 'pcm16' or 'float32', got {encoding!r:.40}")
        channels = int_field(msg, "channels", 1, 8, 1)
        sampling = service.sampling(Talk.fields(msg), "-", reply_speaker)
        service.charge(self.client)
        self.talk = Talk(self, speaker=speaker, reply_speaker=reply_speaker, sample_rate=rate, encoding=encoding,
                         channels=channels, sampling=sampling)
        tt = service.config.turn_taking
        self.send({"type": "talk.started", "responder": service.responder is not None,
                   "vad": {"end_silence_ms": tt.end_silence_ms, "min_speech_ms": tt.min_speech_ms,
                           "barge_in": tt.barge_in}}, msg)

    async def on_talk_stop(self, msg: dict[str, Any]) -> None:
        talk = self.talk
        if talk is None:
            raise ProtocolError("not_talking", "talk mode is not on")
        self.talk = None
        await talk.stop()
        self.send({"type": "talk.stopped"}, msg)

    async def on_history(self, msg: dict[str, Any]) -> None:
        cid = self._need_session()
        limit = None if msg.get("limit") is None else int_field(msg, "limit", 1, 1_000_000)
        turns = await asyncio.to_thread(self.service.manager.history, cid, limit)
        self.send({"type": "history", "conversation_id": cid, "turns": [t.summary() for t in turns]}, msg)

    HANDLERS: ClassVar[dict[str, Callable[..., Awaitable[None]]]] = {
        "session.start": on_session_start,
        "say": on_say,
        "cancel": on_cancel,
        "audio.start": on_audio_start,
        "audio.end": on_audio_end,
        "audio.cancel": on_audio_cancel,
        "history": on_history,
        "talk.start": on_talk_start,
        "talk.stop": on_talk_stop,
    }
