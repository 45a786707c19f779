"""OpenAI-compatible speech and Prometheus metrics on the real server's port, driven by the official `openai` client
and plain HTTP; the audio must equal what the WebSocket protocol streams for the same seed."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
from serve_fixtures import Client, LiveServer, run

TEXT = "Speech over HTTP."


def ws_audio(server: LiveServer, **fields: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The PCM16 a `say` streams in a new conversation -> (int16 [N], response.done)."""

    async def go() -> tuple[list[bytes], dict[str, Any]]:
        c = await Client.open(server.ws_url)
        await c.start()
        _, done, frames = await c.say(TEXT, **fields)
        await c.close()
        return frames, done

    frames, done = run(go())
    return np.frombuffer(b"".join(frames), "<i2"), done


def post(server: LiveServer, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.http_url + path.lstrip("/"), data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_openai_client_streams_the_same_audio_as_the_websocket(live_server: LiveServer) -> None:
    sampling = {"seed": 1234, "max_audio_ms": 640, "temperature": 0.8, "top_k": 30}
    expected, done = ws_audio(live_server, speaker=1, **sampling)
    assert done["frames"] == 8 and len(expected) == 8 * 1920

    client = openai.OpenAI(base_url=live_server.http_url + "v1", api_key="unused", max_retries=0)
    got: dict[str, bytes] = {}
    chunks = 0
    for fmt in ("pcm", "wav", "flac", "mp3", "opus"):
        with client.audio.speech.with_streaming_response.create(model="csm-jax", voice="1", input=TEXT,
                                                                 response_format=fmt, extra_body=sampling) as r:
            assert r.http_response.status_code == 200 and r.headers["x-request-id"].startswith("speech-")
            parts = list(r.iter_bytes())
            chunks = max(chunks, len(parts))
            got[fmt] = b"".join(parts)
    assert chunks > 1  # streamed in pieces, not one body
    np.testing.assert_array_equal(np.frombuffer(got["pcm"], "<i2"), expected)
    assert got["wav"][:4] == b"RIFF" and got["wav"][44:] == got["pcm"]  # a streaming header, then the same PCM
    flac, rate = sf.read(io.BytesIO(got["flac"]), dtype="int16")
    assert rate == 24_000
    np.testing.assert_array_equal(flac, expected)  # lossless
    for lossy in ("mp3", "opus"):
        audio, rate = sf.read(io.BytesIO(got[lossy]), dtype="float32")
        assert rate == 24_000 and abs(len(audio) - len(expected)) <= 2400, (lossy, len(audio))
        assert np.sqrt(np.mean(audio**2)) > 0.1 * np.sqrt(np.mean((expected / 32768.0) ** 2))

    models = json.loads(urllib.request.urlopen(live_server.http_url + "v1/models").read())
    assert models["data"][0]["object"] == "model"


def test_a_stored_conversation_prompts_the_voice(live_server: LiveServer) -> None:
    """`voice` = a conversation id: its turns are the context and its last speaker speaks; nothing is stored. The
    audio equals the next WebSocket turn of that conversation with the same seed."""
    client = openai.OpenAI(base_url=live_server.http_url + "v1", api_key="unused", max_retries=0)

    async def go() -> tuple[bytes, np.ndarray, int]:
        c = await Client.open(live_server.ws_url)
        cid = (await c.start())["conversation_id"]
        await c.say("A first turn.", speaker=3, seed=5, max_audio_ms=240)
        spoken = client.audio.speech.create(model="csm-jax", voice=cid, input=TEXT, response_format="pcm",
                                            extra_body={"seed": 9, "max_audio_ms": 400}).content
        started, _, frames = await c.say(TEXT, speaker=3, seed=9, max_audio_ms=400)
        assert started["context_turns"] == 1  # the speech request stored nothing
        history = await c.request({"type": "history"})
        await c.close()
        return spoken, np.frombuffer(b"".join(frames), "<i2"), len(history["turns"])

    spoken, continued, turns = run(go())
    assert turns == 2 and len(continued) == 5 * 1920
    np.testing.assert_array_equal(np.frombuffer(spoken, "<i2"), continued)


@pytest.mark.parametrize(("body", "headers", "status", "code"), [
    (b'{"model": "m", "input": "Hi.", "voice": "no-such-voice"}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "Hi.", "voice": "0", "response_format": "aac"}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "Hi.", "voice": "0", "speed": 2.0}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "Hi.", "voice": "0", "volume": 3}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "", "voice": "0"}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "\\ud800", "voice": "0"}', {}, 400, "bad_field"),
    (b'{"model": "m", "voice": "0"}', {}, 400, "bad_field"),
    (b'{"model": "m", "input": "' + b"a" * 5000 + b'", "voice": "0"}', {}, 400, "text_too_long"),
    (b'[1, 2]', {}, 400, "bad_json"),
    (b'{"model": ', {}, 400, "bad_json"),
    (b'{"model": "m", "input": "Hi.", "voice": "0"}', {"Content-Type": "text/plain"}, 400, "bad_json"),
    (b'{"model": "m", "input": "Hi.", "voice": "0"}', {"Origin": "http://evil.example"}, 403, "forbidden"),
    (b'{"input": "' + b"a" * 70_000 + b'"}', {}, 413, "too_large"),
])
def test_bad_speech_requests_get_openai_errors(live_server: LiveServer, body: bytes, headers: dict[str, str],
                                               status: int, code: str) -> None:
    got, _, answer = post(live_server, "/v1/audio/speech", body, {"Content-Type": "application/json", **headers})
    error = json.loads(answer)["error"]
    assert (got, error["code"]) == (status, code), error
    assert error["message"] and "Traceback" not in error["message"] and " at 0x" not in error["message"]


def test_method_rules_and_metrics(live_server: LiveServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(live_server.http_url + "v1/audio/speech")
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"
    status, headers, _ = post(live_server, "/health", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and headers["Allow"] == "GET, HEAD"

    ws_audio(live_server, speaker=0, seed=1, max_audio_ms=160)
    post(live_server, "/v1/audio/speech", b'{"model": "m", "input": "Hi.", "voice": "0", "max_audio_ms": 160, '
                                          b'"response_format": "pcm"}', {"Content-Type": "application/json"})
    post(live_server, "/v1/audio/speech", b"[]", {"Content-Type": "application/json"})
    text = urllib.request.urlopen(live_server.http_url + "metrics").read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['csm_requests_total{api="ws",stop_reason="max_length"}'] >= 1
    assert samples['csm_requests_total{api="http",stop_reason="max_length"}'] >= 1
    assert samples['csm_errors_total{code="bad_json"}'] >= 1
    assert samples["csm_frames_total"] >= 4 and samples["csm_ttfa_seconds_count"] >= 2
    assert samples["csm_rtf_count"] >= 2 and samples["csm_requests_active"] == 0
    assert "csm_requests_queued" in samples and "csm_websocket_connections" in samples
    # one log line per request, with its id, frames, TTFA and RTF; no per-HTTP-request access log
    request_line = re.compile(r"\bhttp speech-\d+ client=\S+ frames=2 audio_ms=160 ttfa_ms=[\d.]+ rtf=[\d.]+ ")
    assert any(request_line.search(line) for line in live_server.log), live_server.log[-5:]
    assert not any('"POST /v1/audio/speech' in line or "connection open" in line for line in live_server.log)
