"""csm_jax.client (library + `python -m csm_jax.client`) and bench/load_test.py against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from csm_jax.client import Client, Response, ServerError, fetch_history, main, say_to_wav

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FRAME = 1920


def run(coro):
    return asyncio.run(coro)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csm_jax.client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CSM_JAX_URL": "", "CSM_JAX_TOKEN": ""})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_response(r: Response, max_frames: int) -> None:
    d = r.done
    assert d["type"] == "response.done" and r.response_id == d["response_id"]
    assert r.frames == d["frames"] and 1 <= r.frames <= max_frames
    assert r.audio.dtype == np.float32 and r.audio.shape == (FRAME * r.frames,)
    assert np.all(np.abs(r.audio) <= 1.0)
    assert d["audio_ms"] == pytest.approx(80 * r.frames)
    assert d["stop_reason"] in ("eos", "max_length") and d["turn_id"] is not None
    assert r.ttfa_ms_client is not None and 0 < r.ttfa_ms_client <= r.total_ms_client
    assert d["ttfa_ms"] >= 0 and d["rtf"] > 0


def test_say_streams_frames(live_server):
    frames: list[np.ndarray] = []

    async def go():
        async with Client(live_server.ws_url) as c:
            assert c.ready["type"] == "ready" and c.ready["protocol"] == 1
            assert c.sample_rate == 24_000 and c.frame_samples == FRAME
            cid = await c.start()
            assert c.session["resumed"] is False and c.session["turns"] == 0
            r = await c.say("Hello there.", 0, max_audio_ms=400, top_k=1, on_frame=frames.append)
            return cid, r, await c.history()

    cid, r, turns = run(go())
    check_response(r, max_frames=5)
    assert isinstance(cid, str) and cid and r.conversation_id == cid
    assert r.started["type"] == "response.started" and r.started["response_id"] == r.response_id
    assert len(frames) == r.frames
    assert all(f.dtype == np.int16 and f.shape == (FRAME,) for f in frames)
    np.testing.assert_array_equal(np.concatenate(frames), r.pcm16)
    assert [(t["turn_id"], t["source"], t["speaker"], t["text"], t["frames"]) for t in turns] == [
        (r.done["turn_id"], "generated", 0, "Hello there.", r.frames)]


def test_send_audio_history_resume(live_server):
    stereo = DATA / "speech_stereo_44k.wav"
    info = sf.info(str(stereo))
    assert info.samplerate == 44_100 and info.channels == 2
    clip, sr = sf.read(str(DATA / "speech_1s.wav"), dtype="float32")
    clip16k = soxr.resample(clip, sr, 16_000)

    async def go():
        async with Client(live_server.ws_url) as c:
            cid = await c.start()
            t1 = await c.send_file(stereo, speaker=1, transcript="How are you?")
            t2 = await c.send_audio((clip16k * 32767).astype(np.int16), 16_000, speaker=2, chunk_ms=50)
            r = await c.say("Fine, thanks.", 0, max_audio_ms=240, seed=1)
            return cid, t1, t2, r, await c.history(), await c.history(limit=1)

    cid, t1, t2, r, turns, last = run(go())
    assert t1["source"] == "user" and t1["speaker"] == 1 and t1["text"] == "How are you?"
    assert abs(t1["frames"] - info.duration * 12.5) <= 2
    assert t2["source"] == "user" and t2["speaker"] == 2  # sent without a transcript: the server transcribed it
    assert isinstance(t2["text"], str) and turns[1]["text"] == t2["text"]
    assert abs(t2["frames"] - len(clip16k) / 16_000 * 12.5) <= 2
    assert r.started["context_turns"] == 2
    assert [t["turn_id"] for t in turns] == [t1["turn_id"], t2["turn_id"], r.done["turn_id"]]
    assert [t["index"] for t in turns] == [0, 1, 2] and turns[0] == t1
    assert last == turns[-1:]

    async def resume():
        async with Client(live_server.ws_url) as c:
            assert await c.start(cid) == cid
            return c.session, await c.history()

    session, again = run(resume())
    assert session["resumed"] is True and session["turns"] == 3
    assert again == turns
    assert fetch_history(live_server.ws_url, cid, limit=2) == turns[1:]


def test_cancel(live_server):
    async def go():
        async with Client(live_server.ws_url) as c:
            await c.start()
            first = asyncio.Event()
            task = asyncio.create_task(c.say("A long answer.", 0, max_audio_ms=20_000, seed=2,
                                             on_frame=lambda f: first.set()))
            await asyncio.wait([task, asyncio.create_task(first.wait())], return_when=asyncio.FIRST_COMPLETED)
            done = await c.cancel()
            r = await task
            with pytest.raises(ServerError) as e:
                await c.cancel()  # nothing streams any more
            after = await c.say("Short.", 1, max_audio_ms=160, seed=2)
            return done, r, e.value, after, await c.history()

    done, r, err, after, turns = run(go())
    assert r.done == done and r.stop_reason == "cancelled" and done["turn_id"] is None
    assert 1 <= r.frames == done["frames"] < 250 and len(r.audio) == FRAME * r.frames
    assert err.code == "no_response"
    check_response(after, max_frames=2)
    assert [t["turn_id"] for t in turns] == [after.done["turn_id"]]  # the cancelled response was not stored


def test_server_errors(live_server):
    async def code(coro) -> str:
        try:
            await coro
        except ServerError as e:
            return e.code
        return "no error"

    async def go():
        async with Client(live_server.ws_url) as c:
            limit = c.limits["max_text_chars"]
            before = {
                "say before start": await code(c.say("Hi.", 0)),
                "history before start": await code(c.history()),
                "resume unknown": await code(c.start("no-such-conversation")),
            }
            await c.start()
            after = {
                "speaker -1": await code(c.say("Hi.", -1)),
                "speaker str": await code(c.say("Hi.", "zero")),  # type: ignore[arg-type]
                "long text": await code(c.say("x" * (limit + 1), 0)),
                "max_audio_ms < 0": await code(c.say("Hi.", 0, max_audio_ms=-80)),
                "temperature < 0": await code(c.say("Hi.", 0, temperature=-1.0)),
                "cancel idle": await code(c.cancel()),
                "audio speaker -1": await code(c.send_audio(np.zeros(1000, np.float32), 16_000, speaker=-1)),
                "history limit -1": await code(c.history(limit=-1)),
                "audio too long": await code(c.send_audio(np.zeros(8000 * int(c.limits["max_audio_s"] + 2), np.int16),
                                                          8000, speaker=1, chunk_ms=500)),
            }
            # the connection survived every error (and late errors for the refused turn's chunks fail no request)
            r = await c.say("Still works.", 0, max_audio_ms=160, seed=4)
            return before | after, r, await c.history()

    codes, r, turns = run(go())
    assert codes == {
        "say before start": "no_session", "history before start": "no_session",
        "resume unknown": "unknown_conversation",
        "speaker -1": "bad_field", "speaker str": "bad_field", "long text": "text_too_long",
        "max_audio_ms < 0": "bad_field", "temperature < 0": "bad_field", "cancel idle": "no_response",
        "audio speaker -1": "bad_field", "history limit -1": "bad_field", "audio too long": "audio_too_long",
    }
    check_response(r, max_frames=2)
    assert [t["turn_id"] for t in turns] == [r.done["turn_id"]]


def test_sync_say_to_wav(live_server, tmp_path):
    out = tmp_path / "hi.wav"
    r = say_to_wav(live_server.ws_url, "Hi.", out, speaker=1, max_audio_ms=240, seed=3)
    check_response(r, max_frames=3)
    audio, sr = sf.read(str(out), dtype="int16")
    assert sr == 24_000 and audio.shape == (FRAME * r.frames,)
    np.testing.assert_array_equal(audio, r.pcm16)


def test_cli(live_server, tmp_path, capsys):
    out = tmp_path / "say.wav"
    p = cli("say", "--url", live_server.ws_url, "--speaker", "0", "--text", "Hello from the CLI.", "--out", str(out),
            "--max-audio-ms", "320", "--top-k", "5", "--temperature", "0.8", "--seed", "7")
    assert p.returncode == 0, p.stderr
    assert "conversation: " in p.stdout and "stop " in p.stdout and "rtf" in p.stdout
    cid = p.stdout.split("conversation: ")[1].split()[0]
    info = sf.info(str(out))
    frames = int(p.stdout.split("frames")[0].split()[-1])
    assert info.samplerate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert 1 <= frames <= 4 and info.frames == FRAME * frames

    p = cli("send", "--url", live_server.ws_url, "--conversation", cid, "--wav", str(DATA / "speech_1s.wav"),
            "--speaker", "1", "--transcript", "Got it.", "--json")
    assert p.returncode == 0, p.stderr
    sent = json.loads(p.stdout)
    assert sent["conversation_id"] == cid and sent["resumed"] is True
    assert sent["turn"]["text"] == "Got it." and sent["turn"]["speaker"] == 1 and sent["turn"]["index"] == 1

    assert main(["history", "--url", live_server.ws_url, "--conversation", cid, "--json"]) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    assert [(t["source"], t["speaker"]) for t in turns] == [("generated", 0), ("user", 1)]

    assert main(["history", "--url", live_server.ws_url, "--conversation", "nope"]) == 1
    assert "unknown_conversation" in capsys.readouterr().err


def test_cli_connection_refused(tmp_path):
    url = f"ws://127.0.0.1:{free_port()}/ws"
    p = cli("say", "--url", url, "--text", "Hi.", "--out", str(tmp_path / "x.wav"))
    assert p.returncode == 1
    assert "cannot connect" in p.stderr and "refused" in p.stderr and url in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x.wav").exists()


def test_load_test(live_server):
    p = subprocess.run([sys.executable, "bench/load_test.py", "--url", live_server.ws_url, "--clients", "3",
                        "--requests", "1", "--max-audio-ms", "400", "--seed", "0", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads(p.stdout)
    assert s["requests_ok"] == 3 and s["requests_failed"] == 0 and s["errors"] == {}
    assert 3 <= s["frames_total"] <= 15 and s["audio_s_total"] == pytest.approx(0.08 * s["frames_total"])
    for key in ("ttfa_ms_client", "ttfa_ms_server", "rtf_server", "rtf_client"):
        assert 0 < s[key]["p50"] <= s[key]["p95"], key
    assert s["ttfa_ms_client"]["p95"] <= s["ttfa_ms_client"]["max"] < 60_000
    assert 0 < s["wall_s"] < 120 and s["throughput_audio_s_per_s"] == pytest.approx(s["audio_s_total"] / s["wall_s"])
    assert s["server"]["protocol"] == 1 and s["environment"]["cpu_count"] >= 1
