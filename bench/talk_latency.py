"""Talk-mode latency: end of the user's speech -> first audio of the spoken reply, over N turns, on a server this
script starts (the default model unless `--server-arg model.path=...`), with a scripted OpenAI-compatible chat
server answering (tests/chat_server.py), the microphone streamed in real time (80 ms chunks every 80 ms).

    .venv/bin/python bench/talk_latency.py                    # 20 turns, ~3 min on 2 cores
    .venv/bin/python bench/talk_latency.py --turns 5 --json talk.json

Reported per turn and as p50/p95: `latency` (the last speech sample sent -> first reply frame received), and the
part the server adds beyond the configured end-of-turn silence (`latency - end_silence_ms`): detection, encoding
and transcription of the user turn, the responder's first sentence, prefill and the first frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from chat_server import ChatServer, Piece  # noqa: E402
from serve_fixtures import Client, start_server_process  # noqa: E402

CHUNK = 1920  # 80 ms at 24 kHz


def speech_clip() -> tuple[np.ndarray, int]:
    """(PCM16 [N] at 24 kHz, index just after the last voiced sample)."""
    audio, rate = sf.read(ROOT / "tests" / "data" / "speech_3s.wav", dtype="float32")
    audio = soxr.resample(audio, rate, 24_000)
    envelope = np.convolve(np.abs(audio), np.ones(240) / 240, mode="same")
    voiced = np.nonzero(envelope > 0.02 * envelope.max())[0]
    return (audio * 32767).astype("<i2"), int(voiced[-1]) + 1


async def measure(url: str, turns: int, end_silence_ms: int, max_audio_ms: int) -> list[dict[str, Any]]:
    clip, speech_end = speech_clip()
    c = await Client.open(url)
    await c.start()
    await c.send({"type": "talk.start", "speaker": 1, "reply_speaker": 0, "sample_rate": 24_000,
                  "max_audio_ms": max_audio_ms, "seed": 0})
    first_frame: asyncio.Queue[float] = asyncio.Queue()
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    state = {"waiting": False}

    async def read() -> None:
        async for message in c.ws:
            if isinstance(message, bytes):
                if state["waiting"]:
                    state["waiting"] = False
                    first_frame.put_nowait(time.perf_counter())
            elif (event := json.loads(message))["type"] in ("reply.done", "error"):
                replies.put_nowait(event)

    reader = asyncio.create_task(read())
    silence = np.zeros(CHUNK, "<i2")
    results = []
    t_next = time.perf_counter()

    async def send(chunk: np.ndarray) -> float:
        nonlocal t_next
        await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        await c.ws.send(chunk.tobytes())
        t_next += len(chunk) / 24_000
        return time.perf_counter()

    for turn in range(turns):
        for _ in range(6):
            await send(silence)
        state["waiting"] = True
        ended = 0.0
        for i in range(0, len(clip), CHUNK):
            sent = await send(clip[i:i + CHUNK])
            if i <= speech_end - 1 < i + CHUNK:  # the chunk holding the last voiced sample
                ended = sent + (speech_end - i - CHUNK) / 24_000
        waiter = asyncio.ensure_future(first_frame.get())
        while not waiter.done():
            await send(silence)
        latency = (waiter.result() - ended) * 1e3
        done = await replies.get()
        while not done["type"] == "reply.done":
            print(f"turn {turn}: error {done}", file=sys.stderr)
            done = await replies.get()
        results.append({"turn": turn, "latency_ms": round(latency, 1),
                        "beyond_silence_ms": round(latency - end_silence_ms, 1)})
        print(f"turn {turn:2d}: end of speech -> first reply audio {latency:7.1f} ms", flush=True)
    reader.cancel()
    await c.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--end-silence-ms", type=int, default=700)
    p.add_argument("--max-audio-ms", type=int, default=800)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "csm_jax" / "xla"))
    p.add_argument("--server-arg", action="append", default=[], help="extra Hydra override for the server")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    chat_gen = ChatServer(script=[[Piece("Okay. "), Piece("I hear you.")]] * (args.turns + 1)).serve()
    chat = next(chat_gen)
    with tempfile.TemporaryDirectory(prefix="csm-talk-") as tmp:
        server = start_server_process(Path(tmp), Path(args.cache_dir), "responder.backend=openai",
                                      f"responder.base_url={chat.url}",
                                      f"turn_taking.end_silence_ms={args.end_silence_ms}", "engine.warmup_rows=512",
                                      *args.server_arg)
        try:
            results = asyncio.run(measure(server.ws_url, args.turns, args.end_silence_ms, args.max_audio_ms))
        finally:
            server.stop()
            chat_gen.close()
    lat = np.array([r["latency_ms"] for r in results])
    summary = {"turns": len(results), "end_silence_ms": args.end_silence_ms,
               "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95)),
               "beyond_silence_ms_p50": float(np.percentile(lat - args.end_silence_ms, 50)),
               "beyond_silence_ms_p95": float(np.percentile(lat - args.end_silence_ms, 95))}
    print(f"end of speech -> first reply audio over {len(results)} turns: p50 {summary['latency_ms_p50']:.0f} ms, "
          f"p95 {summary['latency_ms_p95']:.0f} ms (of which the end-of-turn silence is {args.end_silence_ms} ms: "
          f"server work p50 {summary['beyond_silence_ms_p50']:.0f} ms, p95 {summary['beyond_silence_ms_p95']:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "turns": results}, indent=1))


if __name__ == "__main__":
    main()
