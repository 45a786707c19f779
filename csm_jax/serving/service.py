"""What every connection and API shares: the model, the engine loop, the conversation store, the limits, the
metrics, and the one path from validated speech parameters to a scheduled engine request."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from csm_jax.conversation import ContextFull, ConversationManager, UnknownConversation
from csm_jax.conversation.manager import Prompt
from csm_jax.csm.generator import FRAME_MS, Generator
from csm_jax.csm.sampling import Sampling
from csm_jax.dialogue.responder import Responder
from csm_jax.dialogue.transcriber import Transcriber
from csm_jax.serving.config import ServeConfig
from csm_jax.serving.fields import ProtocolError, float_field, int_field, str_field
from csm_jax.serving.metrics import ServerMetrics
from csm_jax.serving.scheduler import Request, Result, Scheduler

log = logging.getLogger("csm_jax.serving")
PROTOCOL_VERSION = 1
SAMPLING_FIELDS = ("temperature", "top_k", "depth_temperature", "depth_top_k")  # optional request fields


@dataclasses.dataclass(frozen=True)
class SpeechParams:
    """A validated speech request: the text, the speaker, the sampling settings, and the voice preset that prompts
    the speaker when the context holds none of its audio (None: none)."""

    text: str
    speaker: int
    max_frames: int
    sampling: Sampling
    seed: int
    voice: str | None = None


class ClientBudgets:
    """Requests per client address (a token bucket each), kept across its reconnects and shared by its WebSocket
    and HTTP requests. Full buckets are forgotten, so memory follows the clients that are spending."""

    def __init__(self, per_min: float, burst: int):
        self.rate, self.burst = per_min / 60.0, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> bool:
        now = time.monotonic()
        tokens, then = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:
            self._buckets = {k: v for k, v in self._buckets.items()
                             if min(self.burst, v[0] + (now - v[1]) * self.rate) < self.burst}
        return True


@dataclasses.dataclass
class Service:
    """Shared state of the server; methods run on the event loop unless they say otherwise."""

    config: ServeConfig
    generator: Generator
    scheduler: Scheduler
    manager: ConversationManager
    model_name: str
    transcriber: Transcriber | None = None
    responder: Responder | None = None
    connections: int = 0  # open WebSockets
    metrics: ServerMetrics = dataclasses.field(init=False)
    clients: ClientBudgets = dataclasses.field(init=False)
    defaults: Sampling = dataclasses.field(init=False)
    voice: str | None = dataclasses.field(init=False)  # the preset of requests that name none

    def __post_init__(self) -> None:
        lim, g = self.config.limits, self.config.generation
        # the sampling of requests that leave it out: the model's, with the server config's settings in place
        self.defaults = self.generator.resolve_sampling(g.temperature, g.top_k, g.depth_temperature, g.depth_top_k)
        try:  # the default preset, checked here (None when the model has none)
            self.voice = g.voice if self.generator.voice(g.voice) else None
        except ValueError as e:
            raise ValueError(f"generation.voice: {e}") from None
        for name in self.generator.voices:  # encode every preset once, off the request path
            self.generator.voice(name)
        self.metrics = ServerMetrics(lambda: self.scheduler.active, lambda: self.scheduler.queued,
                                     lambda: self.connections, self.scheduler.counts)
        self.clients = ClientBudgets(lim.requests_per_min, lim.request_burst)
        self._ids = itertools.count(1)

    def ready_event(self) -> dict[str, Any]:
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "sample_rate": self.generator.codec.sample_rate,
                "frame_samples": self.generator.codec.frame_size, "num_codebooks": self.generator.num_codebooks,
                "model": self.model_name, "limits": dataclasses.asdict(self.config.limits),
                "voices": sorted(self.generator.voices),
                "defaults": dataclasses.asdict(self.defaults) | {"max_audio_ms": self.config.generation.max_audio_ms,
                                                                 "voice": self.voice}}

    def error(self, code: str) -> None:
        self.metrics.errors.labels(code).inc()

    def charge(self, client: str) -> None:
        """Count one request (a response or an audio turn) against `client`'s budget; `rate_limited` when spent."""
        if not self.clients.take(client):
            lim = self.config.limits
            raise ProtocolError("rate_limited", f"over {lim.requests_per_min:g} requests per minute (burst "
                                                f"{lim.request_burst}) from this client; try again later")

    def speech_params(self, msg: dict[str, Any], text_field: str, speaker: int) -> SpeechParams:
        """Text and sampling settings of a `say` event or an HTTP speech body (server defaults fill the gaps)."""
        text = str_field(msg, text_field, self.config.limits.max_text_chars)
        if not text.strip():
            raise ProtocolError("bad_field", f"field {text_field!r} must not be empty")
        return self.sampling(msg, text, speaker)

    def sampling(self, msg: dict[str, Any], text: str, speaker: int) -> SpeechParams:
        """`text` by `speaker` with the sampling fields of `msg` (`max_audio_ms`, `temperature`, `top_k`,
        `depth_temperature`, `depth_top_k`, `seed`, `voice`); `Sampling.override` fills the gaps from
        `self.defaults`, `self.voice` a missing `voice`."""
        vocab, lim = self.generator.cfg.audio_vocab_size, self.config.limits
        max_ms = int_field(msg, "max_audio_ms", FRAME_MS, lim.max_audio_ms, min(self.config.generation.max_audio_ms,
                                                                                 lim.max_audio_ms))
        given = {name: (float_field(msg, name, 1.0) if name.endswith("temperature") else
                        int_field(msg, name, 1, vocab)) for name in SAMPLING_FIELDS if name in msg}
        return SpeechParams(text, speaker, max_ms // FRAME_MS, self.defaults.override(**given),
                            int_field(msg, "seed", 0, 2**32 - 1, secrets.randbelow(2**31)),
                            self.voice_field(msg) if "voice" in msg else self.voice)

    def voice_field(self, msg: dict[str, Any]) -> str | None:
        """A request's `voice`: one of the model's presets, or null for none (`bad_field` otherwise)."""
        name = msg["voice"]
        if name is not None and (not isinstance(name, str) or name not in self.generator.voices):
            raise ProtocolError("bad_field", f"field 'voice' must be one of this model's voices "
                                             f"{sorted(self.generator.voices)} or null, got {name!r:.80}")
        return name

    def check_queue(self) -> None:
        if self.scheduler.queued >= self.config.limits.max_queued:
            raise ProtocolError("overloaded", f"{self.scheduler.queued} responses are waiting for the engine; "
                                              "try again shortly")

    async def prompt(self, conversation_id: str | None, params: SpeechParams) -> Prompt:
        """The voice preset when it applies, the conversation's recent turns (none for None), then the target text;
        `context_full` if it cannot fit."""
        voice = self.generator.voice(params.voice)  # encoded once (at start-up), then cached
        try:
            return await asyncio.to_thread(self.manager.build_prompt, conversation_id, params.text, params.speaker,
                                           params.max_frames, voice)
        except ContextFull as e:
            raise ProtocolError("context_full", str(e)) from None
        except UnknownConversation:
            raise ProtocolError("unknown_conversation", f"no conversation with id {conversation_id!r}") from None

    def submit(self, prompt: Prompt, params: SpeechParams, on_frame: Callable[[np.ndarray], None],
               on_done: Callable[[Result], None]) -> Request:
        """Queue a request on the engine (callbacks run on the engine thread and must not block)."""
        frames = self.metrics.frames

        def frame(pcm: np.ndarray) -> None:
            frames.inc()
            on_frame(pcm)

        s = params.sampling
        request = Request(prompt.tokens, prompt.mask, params.max_frames, s.temperature, s.top_k, params.seed,
                          on_frame=frame, on_done=on_done, depth_temperature=s.depth_temperature,
                          depth_top_k=s.depth_top_k)
        self.scheduler.submit(request)
        return request

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def finished(self, api: str, request_id: str, result: Result, client: str, **extra: Any) -> dict[str, Any]:
        """Record a finished response (metrics, one log line) -> its summary: frames, audio_ms, ttfa_ms, rtf."""
        audio_ms = result.frames * FRAME_MS
        elapsed = result.finished - result.started
        ttfa = None if result.first_frame is None else result.first_frame - result.started
        rtf = elapsed / (audio_ms / 1e3) if audio_ms else None
        self.metrics.requests.labels(api, result.stop_reason).inc()
        if ttfa is not None:
            self.metrics.ttfa.observe(ttfa)
        if rtf is not None:
            self.metrics.rtf.observe(rtf)
        summary = {"frames": result.frames, "audio_ms": audio_ms,
                   "ttfa_ms": None if ttfa is None else round(ttfa * 1e3, 1),
                   "rtf": None if rtf is None else round(rtf, 4), "stop_reason": result.stop_reason}
        details = " ".join(f"{k}={v}" for k, v in {**summary, **extra}.items())
        log.info("%s %s client=%s %s", api, request_id, client, details)
        return summary
