"""Talk mode of one connection (docs/protocol.md): microphone stream -> voice activity -> user turns (codes and
transcript) -> reply text from the responder, spoken sentence by sentence; user speech interrupts a reply.

Audio processing (resampling, VAD) runs in worker threads in arrival order; a finished user turn is encoded,
transcribed and stored in the background, then the reply starts, so the microphone keeps being heard (barge-in)
while the server works.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from csm_jax.audio.processor import SAMPLE_RATE, AudioError, PcmStream
from csm_jax.dialogue.responder import ResponderError, sentences
from csm_jax.dialogue.transcriber import TranscriptionError
from csm_jax.dialogue.turn_taking import Event, SpeechDetector
from csm_jax.serving.audio_turn import AudioTurn
from csm_jax.serving.fields import ProtocolError
from csm_jax.serving.service import SAMPLING_FIELDS, SpeechParams

if TYPE_CHECKING:
    from csm_jax.serving.protocol import Connection

log = logging.getLogger(__name__)
PREROLL_S = 0.3  # audio kept before the detected start of speech (the detector reports it, this is a margin)
TAIL_S = 0.1  # and after its end


class Talk:
    """Talk mode: `push(bytes)` per microphone chunk; `stop()` ends it. Sends its events through `conn`."""

    def __init__(self, conn: Connection, *, speaker: int, reply_speaker: int, sample_rate: int, encoding: str,
                 channels: int, sampling: SpeechParams):
        self.conn, self.service = conn, conn.service
        self.speaker, self.reply_speaker, self.sampling = speaker, reply_speaker, sampling
        self.pcm = PcmStream(sample_rate=sample_rate, channels=channels, encoding=encoding, max_seconds=None)
        self.detector = SpeechDetector(self.service.config.turn_taking)
        self.max_turn = int(self.service.config.limits.max_audio_s * SAMPLE_RATE)
        self.audio = np.zeros((0,), np.float32)  # the stream from sample `self.origin` on, 24 kHz
        self.origin = 0
        self.speech_from: int | None = None  # absolute sample where the current user speech began
        self.work: asyncio.Task[None] | None = None  # storing the last user turn, then its reply
        self.stored: asyncio.Future[None] | None = None  # set once the last user turn is stored
        self.reply: asyncio.Task[None] | None = None
        self.replies = 0

    # microphone ---------------------------------------------------------------------------------------------
    async def push(self, data: bytes) -> None:
        try:
            events = await asyncio.to_thread(self._hear, data)
        except AudioError as e:
            raise ProtocolError("bad_audio", f"{e}; the chunk was dropped") from None
        for event in events:
            await self._on(event)
        if self.speech_from is not None and self.origin + len(self.audio) - self.speech_from > self.max_turn:
            await self._end_turn(self.origin + len(self.audio))  # an endless turn: cut at max_audio_s

    def _hear(self, data: bytes) -> list[Event]:  # worker thread, one at a time (dispatch awaits it)
        samples = self.pcm.push(data)
        self.audio = np.concatenate([self.audio, samples])
        events = self.detector.push(samples, SAMPLE_RATE)
        if self.speech_from is None and not any(e.kind == "speech_started" for e in events):
            keep = int(PREROLL_S * SAMPLE_RATE) + SAMPLE_RATE  # the detector reports starts up to ~1 s back
            drop = max(0, len(self.audio) - keep)
            self.audio, self.origin = self.audio[drop:], self.origin + drop
        return events

    async def _on(self, event: Event) -> None:
        at = event.offset_ms * SAMPLE_RATE // 1000
        if event.kind == "speech_started":
            self.speech_from = at
            self.conn.send({"type": "speech.started", "offset_ms": event.offset_ms})
            if self.service.config.turn_taking.barge_in:
                self.interrupt()
        else:
            self.conn.send({"type": "speech.stopped", "offset_ms": event.offset_ms})
            await self._end_turn(at)

    async def _end_turn(self, end: int) -> None:
        start = max(self.origin, (self.speech_from or end) - int(PREROLL_S * SAMPLE_RATE))
        stop = min(self.origin + len(self.audio), end + int(TAIL_S * SAMPLE_RATE))
        segment = self.audio[start - self.origin: stop - self.origin].copy()
        self.audio, self.origin = self.audio[stop - self.origin:], stop
        self.speech_from = None
        self.stored = asyncio.get_running_loop().create_future()
        self.work = asyncio.create_task(self._turn_then_reply(segment, self.work, self.stored))

    def interrupt(self) -> None:
        """Barge-in: the spoken reply stops at the next frame (its sent frames are stored), the rest is dropped."""
        if self.reply is not None and not self.reply.done():
            self.reply.cancel()

    async def stop(self) -> None:
        """End talk mode: speech in progress becomes a turn; returns once it is stored (a reply goes on)."""
        if self.speech_from is not None:
            await self._end_turn(self.origin + len(self.audio))
        if self.stored is not None:
            await asyncio.shield(self.stored)

    def close(self) -> None:
        """The connection is gone: stop the reply and drop unstored work."""
        for task in (self.reply, self.work):
            if task is not None:
                task.cancel()

    # a user turn, then the reply -------------------------------------------------------------------------
    async def _turn_then_reply(self, segment: np.ndarray, previous: asyncio.Task[None] | None,
                               stored: asyncio.Future[None]) -> None:
        try:
            if previous is not None:  # turns are stored in order; a reply in progress finishes first
                await asyncio.gather(previous, return_exceptions=True)
            kept = await self._store(segment)
        finally:
            if not stored.done():
                stored.set_result(None)
        if kept and self.service.responder is not None:
            self.reply = asyncio.create_task(self._reply())
            await asyncio.gather(self.reply, return_exceptions=True)

    async def _store(self, segment: np.ndarray) -> bool:
        gen, conn = self.service.generator, self.conn
        if len(segment) < gen.codec.frame_size:
            return False
        turn = AudioTurn(gen.codec, gen.cfg.num_codebooks, speaker=self.speaker, sample_rate=SAMPLE_RATE,
                         encoding="float32", max_seconds=self.service.config.limits.max_audio_s + 1.0)

        def encode() -> np.ndarray:
            turn.push(segment.astype("<f4").tobytes())
            return turn.finish()

        async def transcribe() -> str | TranscriptionError | None:
            if self.service.transcriber is None:
                return None
            try:
                return await asyncio.to_thread(self.service.transcriber.transcribe, segment, SAMPLE_RATE)
            except TranscriptionError as e:
                return e

        codes, text = await asyncio.gather(asyncio.to_thread(encode), transcribe())  # side by side
        transcribed = isinstance(text, str)
        if isinstance(text, TranscriptionError):
            log.warning("transcription failed: %s", text)
            conn.error("transcription_failed", f"{text}; the turn is stored without a transcript")
        text = text if isinstance(text, str) else ""
        stored = await asyncio.to_thread(self.service.manager.add_turn, conn.conversation_id, self.speaker, text,
                                         codes, "user")
        conn.send({"type": "turn.stored", "turn": stored.summary(), "frames": stored.frames,
                   "transcribed": transcribed})
        return True

    async def _reply(self) -> None:
        conn, service = self.conn, self.service
        responder = service.responder
        assert responder is not None
        self.replies += 1
        reply_id = f"reply-{self.replies}"
        conn.send({"type": "reply.started", "reply_id": reply_id})
        turns = await asyncio.to_thread(service.manager.history, conn.conversation_id,
                                        service.config.responder.max_history_turns)
        history = [("user" if t.source == "user" else "assistant", t.text) for t in turns]
        texts: list[str] = []
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        interrupted = False

        async def relay(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
            async for delta in deltas:
                texts.append(delta)
                conn.send({"type": "reply.delta", "reply_id": reply_id, "text": delta})
                yield delta

        async def produce() -> None:  # reads the reply text as it comes, cuts it into sentences
            try:
                async with contextlib.aclosing(responder.reply(history)) as deltas:
                    async for sentence in sentences(relay(deltas)):
                        queue.put_nowait(sentence)
            except ResponderError as e:
                conn.error(e.code, e.message)
            finally:
                queue.put_nowait(None)

        producer = asyncio.create_task(produce())
        try:
            n = 0
            while (sentence := await queue.get()) is not None:
                params = dataclasses.replace(self.sampling, text=sentence,
                                             seed=(self.sampling.seed + n) % 2**32)
                n += 1
                result = await conn.speak(params, {"reply_id": reply_id})
                if result.stop_reason not in ("eos", "max_length"):
                    break
        except asyncio.CancelledError:  # barge-in: the sentence being spoken stops; its response.done comes first
            interrupted = True
            speaking = conn.interrupt_response()
            if speaking is not None:
                await asyncio.gather(speaking, return_exceptions=True)
            raise
        except ProtocolError as e:  # e.g. context_full, overloaded
            conn.error(e.code, e.message)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            conn.send({"type": "reply.done", "reply_id": reply_id, "text": "".join(texts),
                       "interrupted": interrupted})

    @staticmethod
    def fields(msg: dict[str, Any]) -> dict[str, Any]:
        """The sampling fields of a `talk.start`, for the replies."""
        return {k: msg[k] for k in ("max_audio_ms", *SAMPLING_FIELDS, "seed", "voice") if k in msg}
