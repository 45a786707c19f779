"""The conversation server over real sockets: streaming, persistence, user audio turns, bad input, durability.

The server runs as a real process (`python -m serve`) on the default model; the test process rebuilds the same
deterministic default model to check that served codes and audio are exactly what the library generates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from serve_fixtures import FRAME_BYTES, ROOT, Client, LiveServer, run, start_server_process
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import csm_jax
from csm_jax.conversation import SQLiteStore
from csm_jax.default_model import byte_tokenizer, random_generator

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def reference() -> csm_jax.Generator:
    """The server's default model, rebuilt in this process."""
    return random_generator(0)


def text_rows(text: str, speaker: int) -> int:
    return len(byte_tokenizer().encode(f"[{speaker}]{text}", add_special_tokens=False).ids) + 2


# ---------------------------------------------------------------------------------------------- end to end ---
def test_say_streams_frames_and_matches_the_library(live_server: LiveServer, reference: csm_jax.Generator) -> None:
    async def go() -> tuple[Any, ...]:
        c = await Client.open(live_server.ws_url)
        session = await c.start()
        started, done, frames = await c.say("Hello there.", speaker=0, max_audio_ms=640, seed=11, top_k=20,
                                            temperature=0.8, depth_temperature=1.3, depth_top_k=7, id="q1")
        history = await c.request({"type": "history"})
        await c.close()
        return c.ready, session, started, done, frames, history

    ready, session, started, done, frames, history = run(go())
    assert ready["sample_rate"] == 24_000 and ready["frame_samples"] == 1920 and ready["protocol"] == 1
    # the sampling a request that leaves it out gets: the model's (no generation_config.json: 0.9 / top 50)
    assert {k: ready["defaults"][k] for k in ("temperature", "top_k", "depth_temperature", "depth_top_k")} == \
        dataclasses.asdict(reference.sampling) == {"temperature": 0.9, "top_k": 50, "depth_temperature": 0.9,
                                                   "depth_top_k": 50}
    assert ready["voices"] == [] and ready["defaults"]["voice"] is None  # the random model has no voice presets
    assert started["id"] == done["id"] == "q1" and started["context_turns"] == 0 and started["voice"] is None
    assert started["prompt_rows"] == text_rows("Hello there.", 0)
    assert done["stop_reason"] == "max_length" and done["frames"] == 8 == len(frames) and done["audio_ms"] == 640
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert done["ttfa_ms"] > 0 and done["rtf"] > 0 and isinstance(done["turn_id"], int)
    assert [t["turn_id"] for t in history["turns"]] == [done["turn_id"]]

    # the served codes are exactly the library's, and the audio is their streaming decode as PCM16
    store = SQLiteStore(live_server.db_path)
    turn = store.turns(session["conversation_id"])[0]
    store.close()
    tokens, mask = reference.prompt("Hello there.", 0)
    codes = reference.generate_codes(tokens, mask, max_frames=8, temperature=0.8, top_k=20, seed=11,
                                     code_limit=2048, depth_temperature=1.3, depth_top_k=7)
    np.testing.assert_array_equal(turn.codes, codes)
    dec = reference.codec.stream_decoder(1)
    audio = np.concatenate([np.asarray(dec.step(c[None]))[0] for c in codes])
    served = np.frombuffer(b"".join(frames), "<i2").astype(np.float32) / 32767
    assert np.abs(served - np.clip(audio, -1, 1)).max() <= 2 / 32767


def test_user_audio_turn_is_stored_as_codes_and_prompts_the_next_response(
        live_server: LiveServer, reference: csm_jax.Generator) -> None:
    audio, rate = sf.read(DATA / "speech_stereo_44k.wav", dtype="int16")  # real speech, 44.1 kHz stereo
    pcm = audio.astype("<i2").tobytes()

    async def go() -> tuple[Any, ...]:
        c = await Client.open(live_server.ws_url)
        session = await c.start()
        stored = await c.send_audio(pcm, chunk=4 * 1411, speaker=1, sample_rate=rate, channels=2,
                                    encoding="pcm16", transcript="Hi, how are you?")
        started, done, _ = await c.say("Fine, thanks.", speaker=0, max_audio_ms=240, seed=3)
        await c.close()
        return session, stored, started, done

    session, stored, started, done = run(go())
    frames = -(-round(len(audio) * 24_000 / rate) // 1920)
    assert stored["type"] == "turn.stored" and stored["frames"] == frames
    assert stored["turn"]["source"] == "user" and stored["turn"]["text"] == "Hi, how are you?"
    # the next prompt holds the user's turn: its text rows, its audio rows (+ end frame), then the target text
    assert started["context_turns"] == 1
    assert started["prompt_rows"] == text_rows("Hi, how are you?", 1) + frames + 1 + text_rows("Fine, thanks.", 0)

    store = SQLiteStore(live_server.db_path)
    user, reply = store.turns(session["conversation_id"])
    store.close()
    assert user.codes.shape == (frames, reference.cfg.num_codebooks)
    offline = np.asarray(reference.codec.encode(csm_jax.load_audio(DATA / "speech_stereo_44k.wav")[None]))[0]
    agree = np.mean(user.codes == offline[: reference.cfg.num_codebooks].T[:frames])
    assert agree > 0.9, agree  # streaming resampler + encoder vs one-shot: same audio up to resampler edges
    # and the reply was generated from exactly that prompt
    tokens, mask = reference.prompt("Fine, thanks.", 0, [csm_jax.Segment(1, "Hi, how are you?")])
    t_user, m_user = reference.code_rows(user.codes)
    n = text_rows("Hi, how are you?", 1)
    tokens = np.concatenate([tokens[:n], t_user, tokens[n:]])
    mask = np.concatenate([mask[:n], m_user, mask[n:]])
    np.testing.assert_array_equal(reply.codes, reference.generate_codes(tokens, mask, max_frames=3, seed=3,
                                                                                 code_limit=2048))


def test_concurrent_clients_and_a_stalled_one(live_server: LiveServer) -> None:
    async def one(i: int) -> dict[str, Any]:
        c = await Client.open(live_server.ws_url)
        await c.start()
        _, done, frames = await c.say(f"Client {i} speaking.", speaker=i % 3, max_audio_ms=480, seed=i)
        await c.close()
        assert len(frames) == done["frames"] == 6
        return done

    async def go() -> list[dict[str, Any]]:
        stalled = await Client.open(live_server.ws_url)  # asks for a long response and never reads it
        await stalled.start()
        await stalled.send({"type": "say", "text": "I never listen.", "speaker": 0, "max_audio_ms": 4000})
        dones = await asyncio.gather(*(one(i) for i in range(6)))
        await stalled.close()
        return dones

    dones = run(go())
    assert all(d["stop_reason"] == "max_length" for d in dones)


def test_cancel_and_disconnect_mid_stream(live_server: LiveServer) -> None:
    async def go() -> tuple[Any, ...]:
        c = await Client.open(live_server.ws_url)
        await c.start()
        await c.send({"type": "say", "text": "A long answer.", "speaker": 0, "max_audio_ms": 20_000})
        started = await c.event()
        assert started["type"] == "response.started"
        assert isinstance(await c.ws.recv(), bytes)
        await c.send({"type": "cancel", "response_id": "r-999"})  # not this response: nothing is cancelled
        while isinstance(message := await c.ws.recv(), bytes):
            pass
        wrong = json.loads(message)
        await c.send({"type": "cancel", "response_id": started["response_id"]})
        while isinstance(message := await c.ws.recv(), bytes):
            pass
        done = json.loads(message)
        history = await c.request({"type": "history"})
        _, again, _ = await c.say("Still here.", max_audio_ms=160)

        d = await Client.open(live_server.ws_url)  # disconnects while its response streams
        await d.start()
        await d.send({"type": "say", "text": "Bye.", "speaker": 0, "max_audio_ms": 20_000})
        await d.event()
        await d.ws.recv()
        await d.ws.close()
        for _ in range(100):  # its slot is released
            health = json.loads(urllib.request.urlopen(live_server.http_url + "health").read())
            if health["active"] == 0:
                break
            await asyncio.sleep(0.1)
        _, after, _ = await c.say("And still here.", max_audio_ms=160)
        await c.close()
        return wrong, done, history, again, health, after

    wrong, done, history, again, health, after = run(go())
    assert wrong["type"] == "error" and wrong["code"] == "no_response" and "r-999" in wrong["message"]
    assert done["type"] == "response.done" and done["stop_reason"] == "cancelled" and done["turn_id"] is None
    assert done["frames"] < 250
    assert history["turns"] == []  # a cancelled response is not stored
    assert again["frames"] == 2 and after["frames"] == 2 and health["active"] == 0


BAD_INPUTS = [
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ({"type": "dance"}, "unknown_type"),
    ({"no": "type"}, "unknown_type"),
    ({"type": "say", "text": 42, "speaker": 0}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": "zero"}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": -1}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "temperature": "hot"}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "top_k": 0}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "depth_temperature": -1.0}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "depth_top_k": 1.5}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "temperature": None}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "max_audio_ms": True}, "bad_field"),
    ({"type": "say", "text": "  ", "speaker": 0}, "bad_field"),
    ({"type": "say", "text": "hi", "speaker": 0, "voice": "default"}, "bad_field"),  # the random model has none
    ({"type": "say", "text": "hi", "speaker": 0, "voice": 3}, "bad_field"),
    ({"type": "say", "text": "x" * 1001, "speaker": 0}, "text_too_long"),
    ({"type": "audio.start", "speaker": 0, "sample_rate": 16000, "encoding": "mp9"}, "bad_field"),
    ({"type": "history", "limit": "all"}, "bad_field"),
    ({"type": "session.start", "conversation_id": "no-such-conversation"}, "unknown_conversation"),
    ({"type": "session.start", "conversation_id": 7}, "bad_field"),
    ({"type": "audio.end"}, "no_audio_turn"),
    (b"\x01\x02\x03\x04", "no_audio_turn"),
    (b"\x00" * (1 << 20 | 1), "too_large"),
    ("[" + " " * (1 << 20) + "]", "too_large"),
    ({"type": "cancel"}, "no_response"),
    # found by hostile testing: non-object JSON, ids that cannot be echoed, what json.loads refuses, lone
    # surrogates, and a size limit counted in bytes
    *[(text, "bad_json") for text in ("42", "1.5", "true", '"valid"', '["id"]')],
    ('{"type": "history", "id": ' + "[" * 900 + "]" * 900 + "}", "bad_field"),
    ("[" * 5000 + "]" * 5000, "bad_json"),
    ('{"type": "say", "text": "hi", "speaker": 0, "seed": ' + "9" * 5000 + "}", "bad_json"),
    ('{"type": "say", "text": "\\ud800", "speaker": 0}', "bad_field"),
    ('{"type": "session.start", "conversation_id": "\\ud800"}', "bad_field"),
    (json.dumps({"type": "say", "text": "\U0001F600" * 300_000, "speaker": 0}, ensure_ascii=False), "too_large"),
]


def test_bad_input_gets_clear_errors_and_loses_nothing(live_server: LiveServer) -> None:
    async def go() -> tuple[Any, ...]:
        other = await Client.open(live_server.ws_url)  # another session streams throughout
        await other.start()
        await other.send({"type": "say", "text": "Meanwhile.", "speaker": 1, "max_audio_ms": 1600, "seed": 1})

        c = await Client.open(live_server.ws_url)
        early = await c.request({"type": "say", "text": "hi", "speaker": 0})
        session = await c.start()
        _, first, _ = await c.say("Before.", max_audio_ms=160)
        errors = []
        for message, _ in BAD_INPUTS:
            errors.append(await c.request(message))
        # unreadable audio: odd PCM16 byte count, NaN floats, a corrupt file
        bad_audio = [await c.send_audio(b"\x00\x01\x02", 3, speaker=1, sample_rate=16000),
                     await c.send_audio(np.full(64, np.nan, "<f4").tobytes(), 256, speaker=1, sample_rate=16000,
                                        encoding="float32"),
                     await c.send_audio(b"RIFF1234WAVEnonsense" * 10, 50, speaker=1, encoding="file")]
        long_audio = await c.send_audio(b"\x00\x00" * 16000 * 61, 16000 * 2 * 10, speaker=1, sample_rate=16000)
        bad_audio.append(await c.send_audio(b"\x01\x00", 2, speaker=1, sample_rate=192_000))  # no 24 kHz sample
        _, last, _ = await c.say("After.", max_audio_ms=160)
        history = await c.request({"type": "history"})
        await c.close()

        frames = []
        while True:
            message = await other.ws.recv()
            if isinstance(message, bytes):
                frames.append(message)
            elif (other_done := json.loads(message))["type"] == "response.done":
                break
        await other.close()
        return early, session, first, errors, bad_audio, long_audio, last, history, other_done, frames

    early, session, first, errors, bad_audio, long_audio, last, history, other_done, frames = run(go())
    assert early["type"] == "error" and early["code"] == "no_session"
    for (message, code), err in zip(BAD_INPUTS, errors):
        assert err["type"] == "error" and err["code"] == code and err["message"], (message, err)
    assert all(e["type"] == "error" and e["code"] == "bad_audio" for e in bad_audio), bad_audio
    assert long_audio["type"] == "error" and long_audio["code"] == "audio_too_long", long_audio
    assert first["frames"] == last["frames"] == 2
    assert [t["text"] for t in history["turns"]] == ["Before.", "After."]  # nothing lost, nothing half-stored
    assert other_done["frames"] == len(frames) == 20


def test_a_response_that_cannot_be_stored_ends_with_an_error(live_server: LiveServer) -> None:
    """Another process holds the database's write lock past the server's busy timeout while a response finishes:
    the client gets `storage_failed` (not silence), the connection carries on, and the history has no such turn."""

    async def go() -> tuple[Any, ...]:
        c = await Client.open(live_server.ws_url)
        await c.start()
        lock = sqlite3.connect(live_server.db_path, isolation_level=None, timeout=30)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            started = await c.request({"type": "say", "text": "Unsaved.", "speaker": 0, "max_audio_ms": 160,
                                       "id": "lost"})
            frames, message = 0, None
            while isinstance(message := await asyncio.wait_for(c.ws.recv(), 120), bytes):
                frames += 1
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        failed = json.loads(message)
        _, after, _ = await c.say("Saved.", max_audio_ms=160)
        history = await c.request({"type": "history"})
        await c.close()
        return started, frames, failed, after, history

    started, frames, failed, after, history = run(go())
    assert started["type"] == "response.started" and frames == 2
    assert failed["type"] == "error" and failed["code"] == "storage_failed" and failed["id"] == "lost", failed
    assert after["turn_id"] is not None and [t["text"] for t in history["turns"]] == ["Saved."]


def test_a_long_high_rate_wav_turn_is_accepted(live_server: LiveServer, reference: csm_jax.Generator) -> None:
    """45 s of 96 kHz 24-bit stereo (26 MB) is within max_audio_s = 60 and must not be refused by a byte cap; its
    codes (made by the streaming encoder, so no new length compiles) equal an offline encode of the file."""
    t = np.arange(45 * 96_000) / 96_000
    stereo = np.stack([np.sin(2 * np.pi * 180 * t), np.sin(2 * np.pi * 240 * t)], axis=1) * 0.3
    buf = io.BytesIO()
    sf.write(buf, stereo, 96_000, format="WAV", subtype="PCM_24")

    async def go() -> tuple[str, dict[str, Any]]:
        c = await Client.open(live_server.ws_url)
        cid = (await c.start())["conversation_id"]
        stored = await c.send_audio(buf.getvalue(), (1 << 20) - 64, speaker=1, encoding="file")
        await c.close()
        return cid, stored

    cid, stored = run(go())
    assert stored["type"] == "turn.stored" and stored["frames"] == 563, stored
    audio = csm_jax.load_audio(buf.getvalue())
    audio = np.pad(audio, (0, -len(audio) % 1920))[None]
    offline = np.asarray(reference.codec.encode(audio))[0, : reference.num_codebooks].T
    store = SQLiteStore(live_server.db_path)
    try:
        turn = next(t for t in store.turns(cid) if t.turn_id == stored["turn"]["turn_id"])
    finally:
        store.close()
    np.testing.assert_array_equal(turn.codes, offline)


def test_server_wide_limits(tmp_path: Path, xla_cache: Path) -> None:
    """Connections, queued responses, conversations per connection and the message rate are bounded; each excess
    gets a clear answer at once (HTTP 503, `overloaded`, `rate_limited`) and the others carry on."""
    server = start_server_process(tmp_path, xla_cache, "limits.max_connections=7", "limits.max_queued=1",
                                  "limits.max_conversations=2", "limits.messages_per_s=2", "limits.message_burst=6",
                                  "limits.request_burst=6", "limits.requests_per_min=0.5")

    async def go() -> tuple[Any, ...]:
        c = await Client.open(server.ws_url)
        first = (await c.start())["conversation_id"]
        await c.start()
        third = await c.request({"type": "session.start"})
        resumed = await c.request({"type": "session.start", "conversation_id": first})
        flood = await Client.open(server.ws_url)
        flooded = [(await flood.request({"type": "history"}))["code"] for _ in range(12)]
        streams = []
        for i in range(5):  # 4 engine slots (engine.batch_size=4), then one waiting
            s = await Client.open(server.ws_url)
            await s.start()
            said = await s.request({"type": "say", "text": f"Long {i}.", "speaker": 0, "max_audio_ms": 20_000})
            assert said["type"] == "response.started", said
            if i < 4:
                assert isinstance(await s.ws.recv(), bytes)  # it has a slot
            streams.append(s)
        overloaded = await c.request({"type": "say", "text": "One more.", "speaker": 0, "max_audio_ms": 160})
        with pytest.raises(InvalidStatus) as e:  # c, flood and 5 streams: 7 open
            await connect(server.ws_url)
        for s in streams:
            await s.ws.close()
        await flood.close()
        await c.close()
        # the 6th request of this address (5 says above): an audio turn, aborted; the budget survives a reconnect
        r = await Client.open(server.ws_url)
        await r.start()
        audio = [(await r.request({"type": "audio.start", "speaker": 1, "sample_rate": 24_000}))["type"]]
        await r.send(np.zeros(2400, "<i2").tobytes())
        audio += [await r.request({"type": "audio.cancel"}), await r.request({"type": "audio.cancel"})]
        await r.close()
        r = await Client.open(server.ws_url)
        await r.start()
        audio.append(await r.request({"type": "audio.start", "speaker": 1, "sample_rate": 24_000}))
        await r.close()
        return third, resumed, flooded, overloaded, e.value.response.status_code, audio

    try:
        third, resumed, flooded, overloaded, full, audio = run(go())
    finally:
        server.stop()
    assert audio[0] == "audio.started" and audio[1]["type"] == "audio.cancelled", audio
    assert audio[2]["code"] == "no_audio_turn", audio  # nothing left to cancel
    assert audio[3]["code"] == "rate_limited" and "per minute" in audio[3]["message"], audio
    assert third["code"] == "rate_limited" and "2 conversations" in third["message"]
    assert resumed["type"] == "session.started" and resumed["resumed"]
    assert flooded[:5] == ["no_session"] * 5 and flooded.count("rate_limited") >= 4, flooded
    assert overloaded["type"] == "error" and overloaded["code"] == "overloaded", overloaded
    assert full == 503


def test_by_default_only_the_servers_own_page_may_connect(live_server: LiveServer) -> None:
    port = live_server.http_url.rstrip("/").rsplit(":", 1)[1]

    async def go() -> list[Any]:
        out: list[Any] = []
        for origin in ("http://evil.example", f"http://evil.example:{port}", "http://127.0.0.1:1", "null"):
            with pytest.raises(InvalidStatus) as e:
                await connect(live_server.ws_url, origin=origin)
            out.append(e.value.response.status_code)
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):  # own page, or no browser
            c = await Client.open(live_server.ws_url, origin=origin)
            out.append(c.ready["type"])
            await c.close()
        return out

    assert run(go()) == [403] * 4 + ["ready"] * 3


def test_a_public_bind_without_a_token_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "serve", "server.host=0.0.0.0", "server.port=0",
                           f"storage.path={tmp_path / 'db'}", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "CSM_JAX_TOKEN"})
    assert proc.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a token" in proc.stdout + proc.stderr
    assert not (tmp_path / "db").exists()  # refused before anything was loaded or created


def test_an_unreachable_database_stops_the_server_at_once_with_one_line(tmp_path: Path) -> None:
    url = "postgresql://csm:secret@127.0.0.1:1/history"  # nothing listens on port 1
    proc = subprocess.run([sys.executable, "-m", "serve", "server.port=0", f"storage.url={url}",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "cannot connect to the conversation store postgresql://csm@127.0.0.1:1/history" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert "warmup" not in proc.stdout + proc.stderr  # refused before the model was loaded and compiled


# ------------------------------------------------------------------------------------- durability, http ---
def test_kill_9_loses_no_acknowledged_turn_and_auth(tmp_path: Path, xla_cache: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")  # from a file: the secret never reaches Hydra's saved config
    overrides = (f"server.token_file={tmp_path / 'token'}", "server.allowed_origins=[http://good.example]")
    server = start_server_process(tmp_path, xla_cache, *overrides)
    url = server.ws_url + "?token=s3cret"

    async def talk() -> tuple[str, list[int]]:
        c = await Client.open(url)
        cid = (await c.start())["conversation_id"]
        pcm = (np.sin(np.arange(12_000) / 7) * 8000).astype("<i2").tobytes()
        ids = [(await c.send_audio(pcm, 3200, speaker=1, sample_rate=12_000, transcript="Hey."))["turn"]["turn_id"]]
        for text in ("One.", "Two."):
            _, done, _ = await c.say(text, max_audio_ms=160)
            ids.append(done["turn_id"])
        server.stop(kill=True)  # SIGKILL right after the last acknowledgement
        return cid, ids

    async def refused() -> list[int]:
        codes = []
        for kwargs in ({"uri": server.ws_url}, {"uri": server.ws_url + "?token=wrong"},
                       {"uri": url, "origin": "http://evil.example"}):
            with pytest.raises(InvalidStatus) as e:
                await connect(**kwargs)
            codes.append(e.value.response.status_code)
        c = await Client.open(server.ws_url, additional_headers={"Authorization": "Bearer s3cret"},
                              origin="http://good.example")
        await c.close()
        return codes

    assert run(refused()) == [401, 401, 403]
    cid, ids = run(talk())
    assert server.process.returncode == -9

    restarted = start_server_process(tmp_path, xla_cache, *overrides, db_path=server.db_path)
    try:
        async def resume() -> tuple[dict[str, Any], dict[str, Any]]:
            c = await Client.open(restarted.ws_url + "?token=s3cret")
            session = await c.start(cid)
            history = await c.request({"type": "history"})
            await c.close()
            return session, history

        session, history = run(resume())
    finally:
        restarted.stop()
    assert session["resumed"] and session["turns"] == 3
    assert [t["turn_id"] for t in history["turns"]] == ids
    with sqlite3.connect(server.db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_http_serves_the_page_and_health(live_server: LiveServer) -> None:
    page = urllib.request.urlopen(live_server.http_url)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"<html" in page.read().lower()
    health = json.loads(urllib.request.urlopen(live_server.http_url + "health").read())
    assert health["status"] == "ok"
    for path in ("missing.js", "..%2F..%2Fpyproject.toml", "../pyproject.toml", "a" * 300, "b/" * 4000):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(live_server.http_url + path)
        assert e.value.code == 404 and b"Traceback" not in e.value.read()
    head = urllib.request.urlopen(urllib.request.Request(live_server.http_url, method="HEAD"))
    assert head.status == 200 and head.read() == b"" and int(head.headers["Content-Length"]) > 0
    for method in ("POST", "PUT", "DELETE"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(live_server.http_url, method=method))
        assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
