"""OpenAI-compatible text-to-speech: `POST /v1/audio/speech` on the server's port and engine (docs/protocol.md).

Body: `model` (any name; one model is served), `input` (the text), `voice` (one of the model's voice presets such as
"default", spoken as speaker 0; a speaker id such as "0"; or the id of a stored conversation whose turns prompt the
voice: the reply continues it as its last speaker and is not stored),
`response_format` (wav and pcm stream frame by frame as they are generated; flac, mp3 and opus are encoded when the
response is complete), `speed` (1.0 only), plus this server's `seed`, `temperature`, `top_k`, `max_audio_ms`.
pcm is raw signed 16-bit little-endian mono at the codec's 24 kHz, as OpenAI's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import struct
from typing import Any

import numpy as np
import soundfile as sf
from aiohttp import web

from csm_jax.conversation import UnknownConversation
from csm_jax.serving.fields import MAX_ID_CHARS, ProtocolError, float_field, parse_object, str_field
from csm_jax.serving.scheduler import Result
from csm_jax.serving.service import Service

log = logging.getLogger(__name__)

STREAMED = {"wav": "audio/wav", "pcm": "audio/pcm"}
ENCODED = {"flac": ("FLAC", "PCM_16", "audio/flac"), "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
           "opus": ("OGG", "OPUS", "audio/ogg")}
FIELDS = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "seed",
          "temperature", "top_k", "depth_temperature", "depth_top_k", "max_audio_ms"}
STATUS = {"rate_limited": 429, "overloaded": 503, "unauthorized": 401, "forbidden": 403, "too_large": 413,
          "internal": 500}
ERROR_TYPES = {429: "rate_limit_error", 401: "authentication_error", 500: "server_error", 503: "server_error"}


def openai_error(service: Service, error: ProtocolError, param: str | None = None) -> web.Response:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, HTTP status by code."""
    service.error(error.code)
    status = STATUS.get(error.code, 400)
    body = {"error": {"message": error.message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": error.code}}
    response = web.json_response(body, status=status)
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 44-byte PCM16 mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming servers
    write it; readers take the data to the end of the stream)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                                     sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """int16 [N] -> a complete file in `fmt` (one of ENCODED)."""
    container, subtype, _ = ENCODED[fmt]
    out = io.BytesIO()
    with sf.SoundFile(out, "w", sample_rate, 1, subtype, format=container) as f:
        f.write(pcm.astype(np.int16))
    return out.getvalue()


async def _voice(service: Service, value: Any) -> tuple[int, str | None, str | None]:
    """`voice` -> (speaker, conversation id of the voice prompt or None, voice preset: the named one, else the
    server's default)."""
    if isinstance(value, str) and value in service.generator.voices:
        return 0, None, value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value, None, service.voice
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10 and int(value) < 2**31:
        return int(value), None, service.voice
    if isinstance(value, str):
        cid = str_field({"voice": value}, "voice", MAX_ID_CHARS)
        try:
            last = await asyncio.to_thread(service.manager.history, cid, 1)
        except (UnknownConversation, TypeError, ValueError):  # no such conversation, an id the store refuses
            last = None
        if last:
            return last[-1].speaker, cid, service.voice
    raise ProtocolError("bad_field", f"field 'voice' must be one of this model's voices "
                                     f"{sorted(service.generator.voices)}, a speaker id (e.g. \"0\") or the id of a "
                                     f"stored conversation with at least one turn, got {value!r:.80}")


async def _parse(service: Service, request: web.Request) -> tuple[dict[str, Any], str]:
    if request.content_type != "application/json":
        raise ProtocolError("bad_json", f"the body must be JSON (Content-Type: application/json), got "
                                        f"{request.content_type!r}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProtocolError("too_large", f"the body is over the limit of {service.config.limits.max_body_bytes} "
                                         "bytes") from None
    body = parse_object(raw)
    unknown = sorted(k for k in body if k not in FIELDS)
    if unknown:
        raise ProtocolError("bad_field", f"unknown fields {unknown}; known: {sorted(FIELDS)}")
    str_field(body, "model", 256)
    fmt = body.get("response_format", "mp3")
    if fmt not in STREAMED and fmt not in ENCODED:
        raise ProtocolError("bad_field", f"field 'response_format' must be one of "
                                         f"{sorted([*STREAMED, *ENCODED])}, got {fmt!r:.40}")
    if float_field(body, "speed", 1.0) != 1.0:
        raise ProtocolError("bad_field", "field 'speed': only 1.0 is supported")
    if body.get("stream_format", "audio") != "audio":
        raise ProtocolError("bad_field", "field 'stream_format': only \"audio\" is supported")
    if body.get("instructions"):
        raise ProtocolError("bad_field", "field 'instructions' is not supported (prompt the voice with a stored "
                                         "conversation as 'voice')")
    return body, fmt


async def speech(request: web.Request, service: Service, client: str) -> web.StreamResponse:
    """The `POST /v1/audio/speech` handler (auth and Origin were checked by the caller)."""
    try:
        body, fmt = await _parse(service, request)
        speaker, voice_cid, preset = await _voice(service, body.get("voice"))
        params = service.speech_params({k: v for k, v in body.items() if k != "voice"}, "input", speaker)
        params = dataclasses.replace(params, voice=preset)
        service.check_queue()
        service.charge(client)
        prompt = await service.prompt(voice_cid, params)
    except ProtocolError as e:
        return openai_error(service, e)
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[np.ndarray | Result] = asyncio.Queue()
    request_id = service.next_id("speech")

    def done(result: Result) -> None:  # event loop
        service.finished("http", request_id, result, client, voice=voice_cid or preset or speaker, format=fmt)
        items.put_nowait(result)

    job = service.submit(prompt, params, lambda pcm: loop.call_soon_threadsafe(items.put_nowait, pcm),
                         lambda result: loop.call_soon_threadsafe(done, result))
    rate = service.generator.codec.sample_rate
    try:
        if fmt in STREAMED:
            response = web.StreamResponse(headers={"Content-Type": STREAMED[fmt], "X-Request-Id": request_id,
                                                   "Cache-Control": "no-cache"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            if fmt == "wav":
                await response.write(streaming_wav_header(rate))
            try:
                while not isinstance(item := await items.get(), Result):
                    await response.write(item.tobytes())
                await response.write_eof()
            except ConnectionError:  # the client went away: `finally` stops its generation
                pass
            return response
        chunks = []
        while not isinstance(item := await items.get(), Result):
            chunks.append(item)
        if item.stop_reason == "error":
            return openai_error(service, ProtocolError("internal", "generation failed; see the server log"))
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        data = await asyncio.to_thread(encode, pcm, rate, fmt)
        return web.Response(body=data, headers={"Content-Type": ENCODED[fmt][2], "X-Request-Id": request_id})
    finally:
        job.cancel()  # a no-op once finished; stops generation for a client that went away
