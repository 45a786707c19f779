"""Load test for the csm-jax conversation server: N concurrent clients mixing WebSocket `say`, user audio turns and
HTTP speech, with an optional `kill -9` in the middle and a durability check after a restart.

Run from the repository root:

    .venv/bin/python bench/load_test.py                                   # a RUNNING server: 16 clients x 2 say
    .venv/bin/python bench/load_test.py --url ws://HOST:8765/ws --clients 32 --requests 4 --max-audio-ms 4000
    .venv/bin/python bench/load_test.py --clients 3 --requests 1 --max-audio-ms 400 --json   # machine-readable
    .venv/bin/python bench/load_test.py --spawn --clients 64 --requests 2 --kill9-after 20 --json load.json

Modes (`--mix say,audio,http`, the default; client i uses mix[i % len(mix)]):

- say: one WebSocket connection and conversation, `--requests` `say` events in a row (the conversation grows);
- audio: the same, but each request is a user audio turn (`--audio-file`, sent as PCM16 chunks at its own sample
  rate: `audio.start`, binary chunks, `audio.end` -> `turn.stored`) followed by a `say` reply;
- http: `--requests` `POST /v1/audio/speech` calls (response_format pcm, streamed), checked for whole 3840-byte
  frames.

`--spawn` starts the server itself (`python -m serve` on the default model, port 0, a fresh database in a temporary
directory or `--db`, the persistent XLA cache `--cache-dir`), with the per-address request budget raised (every
client of this test comes from 127.0.0.1, which a real deployment would rate-limit as one client); `--server-arg
key=value` adds Hydra overrides. It reads the server's memory (VmRSS, VmHWM from /proc) when it is ready and idle,
during the load and after it. `--kill9-after S` sends SIGKILL to the server S seconds into the load, while
requests are in flight; the errors this causes are counted as `killed`, not as failures. In spawn mode the server
is always killed with SIGKILL at the end (if it is still up), restarted on the same database, and every
acknowledged turn (`response.done` with a `turn_id`, `turn.stored`) is looked up with `session.start` + `history`.

Reported: per mode and overall, time to first audio measured by the client (WebSocket: `say` sent -> first binary
frame; HTTP: request sent -> first body chunk) p50/p95, the server's own `ttfa_ms`, real-time factors, errors by
code; documented `overloaded` answers (WebSocket error `overloaded`, HTTP 503 with code `overloaded`) are counted
apart and are not failures. Every other error is a failure: exit status 1, as is any acknowledged turn missing
after the restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf
import websockets

from csm_jax.client import DEFAULT_URL, Client, ServerError

ROOT = Path(__file__).resolve().parents[1]
FRAME_SAMPLES = 1920
FRAME_BYTES = 2 * FRAME_SAMPLES
MODES = ("say", "audio", "http")
DEFAULT_AUDIO = ROOT / "tests" / "data" / "speech_3s.wav"
DEFAULT_AUDIO_TRANSCRIPT = "The quick brown fox jumps over the lazy dog."  # what tests/data/speech_3s.wav says
READY = re.compile(r"websocket: (ws://\S+)")
READY_TIME = re.compile(r"server ready in ([0-9.]+) s")
# every client of the test shares 127.0.0.1: the per-address request budget meant for real clients is raised
RAISED_LIMITS = ("limits.requests_per_min=1000000", "limits.request_burst=100000")
DOCUMENTED = "overloaded"


def raised_limits(extra: list[str]) -> list[str]:
    """RAISED_LIMITS, less the keys that --server-arg sets itself (Hydra refuses a key given twice)."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in extra}
    return [a for a in RAISED_LIMITS if a.split("=", 1)[0] not in given]


def environment() -> dict[str, Any]:
    """The client side's environment. (bench_env.environment describes the JAX/torch process it runs in; here the
    model runs in the server, so only the client's versions, cores and load are relevant.)"""
    return {
        "python": platform.python_version(), "websockets": websockets.__version__, "aiohttp": aiohttp.__version__,
        "numpy": np.__version__, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_1min_start": os.getloadavg()[0],
    }


def print_environment(env: dict[str, Any]) -> None:
    load = env["loadavg_1min_start"]
    print(f"python {env['python']} | websockets {env['websockets']} | aiohttp {env['aiohttp']} | cpus: "
          f"{env['cpu_count']} (usable {env['cpus_usable']}) | load average (1 min) at start: {load:.2f}"
          + ("  <- other processes are busy; timings will be noisy" if load > 0.5 else ""))


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95)) -> dict[str, float | None]:
    """{"p50": ..., "p95": ...} with numpy percentiles (None where there are no values)."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(np.asarray(values, np.float64), qs), strict=True)}


# ------------------------------------------------------------------------------------------- the server ---
def memory_mb(pid: int) -> dict[str, float] | None:
    """{"rss_mb", "hwm_mb"} of a live process from /proc/<pid>/status (VmRSS, and VmHWM: its peak RSS so far)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
          if k in ("VmRSS", "VmHWM")}
    if "VmRSS" not in kb:  # a zombie has no memory lines
        return None
    return {"rss_mb": kb["VmRSS"] / 1024.0, "hwm_mb": kb.get("VmHWM", kb["VmRSS"]) / 1024.0}


class SpawnedServer:
    """`python -m serve` on the default model as a subprocess on a free port; its output goes to `log_path`."""

    def __init__(self, workdir: Path, db_path: Path, cache_dir: Path, extra: list[str], name: str):
        self.overrides = ["server.port=0", f"storage.path={db_path}", f"engine.compile_cache_dir={cache_dir}",
                          f"hydra.run.dir={workdir / ('hydra-' + name)}", *raised_limits(extra), *extra]
        self.cmd = [sys.executable, "-m", "serve", *self.overrides]
        self.log_path = workdir / f"server-{name}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.ws_url = ""
        self.ready_s: float | None = None  # the server's own "ready in X s"
        self.start_wall_s: float | None = None  # spawn -> ready line, measured here
        self.tail: list[str] = []
        self.killed = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float) -> None:
        t0 = time.perf_counter()
        found = threading.Event()
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def pump() -> None:  # drain the output so the server never blocks on a full pipe
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.tail = [*self.tail[-39:], line]
                if not found.is_set():
                    if m := READY_TIME.search(line):
                        self.ready_s = float(m.group(1))
                    if m := READY.search(line):
                        self.ws_url = m.group(1)
                        found.set()
            log.close()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(f"the server did not start (log: {self.log_path}):\n" + "".join(self.tail[-25:]))
        self.start_wall_s = time.perf_counter() - t0

    def memory(self) -> dict[str, float] | None:
        return None if self.proc is None or self.proc.poll() is not None else memory_mb(self.proc.pid)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.killed = True
        if self.proc is not None:
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


def urls(args: argparse.Namespace) -> list[str]:
    """The servers under test: `--url` may list several replicas, comma-separated."""
    return [u.strip() for u in args.url.split(",") if u.strip()]


def url_for(args: argparse.Namespace, i: int) -> str:
    """Client i's server: the replicas in turn."""
    all_urls = urls(args)
    return all_urls[i % len(all_urls)]


def http_url(ws_url: str, path: str) -> str:
    """ws://host:port/ws?token=... -> http://host:port<path>."""
    u = urllib.parse.urlsplit(ws_url)
    return urllib.parse.urlunsplit(({"wss": "https"}.get(u.scheme, "http"), u.netloc, path, "", ""))


# -------------------------------------------------------------------------------------------- the load ---
class Collector:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []  # every error answer, with its kind: failure / overloaded / killed
        self.acks: list[dict[str, Any]] = []  # acknowledged turns: conversation_id, turn_id, mode, kind, frames
        self.conversations: dict[str, str] = {}  # conversation id -> mode (every session.started)
        self.server: dict[str, Any] = {}
        self.first_connect: float | None = None
        self.last_done: float | None = None
        self.kill_time: float | None = None
        self.in_flight = 0
        self.load_done = False

    def error(self, client: int, request: int | None, mode: str, code: str, message: str) -> None:
        if code == DOCUMENTED:
            kind = "overloaded"
        elif self.kill_time is not None and time.perf_counter() >= self.kill_time:
            kind = "killed"
        else:
            kind = "failure"
        self.errors.append({"client": client, "request": request, "mode": mode, "code": code, "kind": kind,
                            "message": message[:300]})

    def ack(self, conversation_id: str | None, turn_id: Any, mode: str, kind: str, frames: Any, text: str) -> None:
        if conversation_id is not None and turn_id is not None:
            self.acks.append({"conversation_id": conversation_id, "turn_id": turn_id, "mode": mode, "kind": kind,
                              "frames": frames, "text": text})

    def done(self, t: float) -> None:
        self.last_done = max(t, self.last_done or t)


def seed_of(args: argparse.Namespace, i: int, j: int) -> int | None:
    return None if args.seed is None else args.seed + i * args.requests + j


def say_record(i: int, j: int, mode: str, r: Any, wall_s: float) -> dict[str, Any]:
    d = r.done
    return {"client": i, "request": j, "mode": mode, "frames": r.frames, "audio_s": r.audio_s, "wall_s": wall_s,
            "ttfa_ms_client": r.ttfa_ms_client, "ttfa_ms_server": d.get("ttfa_ms"), "rtf_server": d.get("rtf"),
            "rtf_client": wall_s / r.audio_s if r.audio_s > 0 else None, "stop_reason": d.get("stop_reason"),
            "context_turns": r.started.get("context_turns")}


async def ws_client(i: int, mode: str, args: argparse.Namespace, col: Collector, audio: np.ndarray,
                    audio_rate: int) -> None:
    """A `say` or `audio` client: one connection, one conversation, `--requests` requests in a row."""
    current = 0
    t_connect = time.perf_counter()
    col.first_connect = min(t_connect, col.first_connect or t_connect)
    try:
        async with Client(url_for(args, i), args.token, timeout=args.timeout, open_timeout=args.timeout) as c:
            col.server = col.server or c.ready
            cid = await c.start()
            col.conversations[cid] = mode
            for j in range(args.requests):
                current = j
                col.in_flight += 1
                try:
                    turn_ms = None
                    if mode == "audio":
                        t0 = time.perf_counter()
                        turn = await c.send_audio(audio, audio_rate, args.audio_speaker, args.audio_transcript)
                        turn_ms = (time.perf_counter() - t0) * 1000.0
                        col.ack(cid, turn.get("turn_id"), mode, "user", turn.get("frames"), args.audio_transcript)
                    t0 = time.perf_counter()
                    r = await c.say(args.text, args.speaker, max_audio_ms=args.max_audio_ms, seed=seed_of(args, i, j),
                                    temperature=args.temperature, top_k=args.top_k)
                except ServerError as e:  # answered with an error event: the connection goes on
                    col.error(i, j, mode, e.code, e.message)
                    if e.code == DOCUMENTED:
                        await asyncio.sleep(1.0)  # "try again shortly"
                    continue
                finally:
                    col.in_flight -= 1
                t1 = time.perf_counter()
                col.done(t1)
                d = r.done
                col.ack(cid, d.get("turn_id"), mode, "generated", d.get("frames"), args.text)
                if len(r.audio) != FRAME_SAMPLES * int(d.get("frames", -1)) or r.frames != d.get("frames"):
                    col.error(i, j, mode, "frames_mismatch", f"{r.frames} frames / {len(r.audio)} samples received, "
                                                             f"response.done says {d.get('frames')} frames")
                    continue
                col.records.append({**say_record(i, j, mode, r, t1 - t0), "audio_turn_ms": turn_ms})
    except ServerError as e:  # session.start refused
        col.error(i, current, mode, e.code, e.message)
    except Exception as e:  # noqa: BLE001 - connection refused / closed / timeout: counted, the others go on
        col.error(i, current, mode, type(e).__name__, str(e) or repr(e))
    else:
        return
    for j in range(current + 1, args.requests):  # requests never sent because the connection failed
        col.error(i, j, mode, "not_sent", "the client's connection had failed")


async def http_client(i: int, args: argparse.Namespace, col: Collector) -> None:
    """`--requests` POST /v1/audio/speech calls in a row, each streamed as raw PCM16."""
    url = http_url(url_for(args, i), "/v1/audio/speech")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.timeout, sock_read=args.timeout)
    t_connect = time.perf_counter()
    col.first_connect = min(t_connect, col.first_connect or t_connect)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for j in range(args.requests):
            body: dict[str, Any] = {"model": "x", "input": args.text, "voice": str(args.speaker),
                                    "response_format": "pcm", "max_audio_ms": args.max_audio_ms}
            for key, value in (("seed", seed_of(args, i, j)), ("temperature", args.temperature),
                               ("top_k", args.top_k)):
                if value is not None:
                    body[key] = value
            col.in_flight += 1
            t0 = time.perf_counter()
            first: float | None = None
            n = 0
            try:
                async with session.post(url, json=body) as resp:
                    if resp.status != 200:
                        try:
                            err = (await resp.json(content_type=None)).get("error") or {}
                        except (ValueError, aiohttp.ClientError):
                            err = {}
                        code = str(err.get("code") or f"http_{resp.status}")
                        if code == DOCUMENTED and resp.status != 503:
                            code = f"{code}_http_{resp.status}"  # documented only as a 503
                        col.error(i, j, "http", code, f"HTTP {resp.status}: {err.get('message', '')}")
                        if code == DOCUMENTED:
                            await asyncio.sleep(float(resp.headers.get("Retry-After", "1") or 1))
                        continue
                    async for chunk in resp.content.iter_any():
                        if chunk and first is None:
                            first = time.perf_counter()
                        n += len(chunk)
            except Exception as e:  # noqa: BLE001 - refused / reset / timeout: counted, the next request goes on
                col.error(i, j, "http", type(e).__name__, str(e) or repr(e))
                if col.kill_time is not None:
                    for k in range(j + 1, args.requests):
                        col.error(i, k, "http", "not_sent", "the server was killed")
                    return
                continue
            finally:
                col.in_flight -= 1
            t1 = time.perf_counter()
            col.done(t1)
            frames, rest = divmod(n, FRAME_BYTES)
            if rest or frames > args.max_audio_ms // 80:
                col.error(i, j, "http", "frames_mismatch", f"{n} bytes: not 0..{args.max_audio_ms // 80} whole "
                                                           f"frames of {FRAME_BYTES} bytes")
                continue
            if frames == 0:  # a generation that fails ends the stream with no audio (HTTP has no error after 200)
                col.error(i, j, "http", "empty_response", "HTTP 200 with no audio")
                continue
            audio_s = frames * FRAME_SAMPLES / 24_000
            col.records.append({"client": i, "request": j, "mode": "http", "frames": frames, "audio_s": audio_s,
                                "wall_s": t1 - t0, "ttfa_ms_client": None if first is None else (first - t0) * 1e3,
                                "ttfa_ms_server": None, "rtf_server": None, "rtf_client": (t1 - t0) / audio_s,
                                "stop_reason": None, "context_turns": None})


async def run_client(i: int, mode: str, args: argparse.Namespace, col: Collector, audio: np.ndarray,
                     audio_rate: int) -> None:
    if args.ramp_s > 0 and args.clients > 1:
        await asyncio.sleep(args.ramp_s * i / (args.clients - 1))
    if mode == "http":
        await http_client(i, args, col)
    else:
        await ws_client(i, mode, args, col, audio, audio_rate)


async def watch_server(server: SpawnedServer, args: argparse.Namespace, col: Collector, t_start: float,
                       info: dict[str, Any]) -> None:
    """Sample the server's memory while the load runs; with --kill9-after, SIGKILL it that many seconds in."""
    samples: list[float] = []
    info["rss_samples_mb"] = samples
    while not col.load_done:
        mem = server.memory()
        if mem is not None:
            samples.append(mem["rss_mb"])
            info["last"] = mem
        if args.kill9_after is not None and col.kill_time is None and time.perf_counter() - t_start >= args.kill9_after:
            info["at_kill"] = server.memory()
            info["kill"] = {"after_s": time.perf_counter() - t_start, "in_flight": col.in_flight}
            col.kill_time = time.perf_counter()  # first: every error from here on is the kill's
            os.kill(server.pid, signal.SIGKILL)
            server.killed = True
            return
        await asyncio.sleep(0.25)


async def run_load(args: argparse.Namespace, col: Collector, audio: np.ndarray, audio_rate: int,
                   server: SpawnedServer | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    t_start = time.perf_counter()
    watcher = asyncio.create_task(watch_server(server, args, col, t_start, info)) if server else None
    await asyncio.gather(*(run_client(i, args.mix[i % len(args.mix)], args, col, audio, audio_rate)
                           for i in range(args.clients)))
    col.load_done = True
    info["load_s"] = time.perf_counter() - t_start
    if watcher is not None:
        await watcher
    return info


# ------------------------------------------------------------------------------------------ durability ---
async def verify(url: str, args: argparse.Namespace, col: Collector) -> dict[str, Any]:
    """Resume every conversation of the test on the restarted server; every acknowledged turn must be there."""
    by_cid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in col.acks:
        by_cid[a["conversation_id"]].append(a)
    out: dict[str, Any] = {"acknowledged": len(col.acks), "conversations": len(col.conversations), "present": 0,
                           "lost": 0, "altered": 0, "conversations_missing": 0, "unacknowledged_stored": 0,
                           "check_errors": 0, "samples": []}
    sem = asyncio.Semaphore(8)

    async def check(cid: str) -> None:
        acked = by_cid.get(cid, [])
        async with sem:
            try:
                async with Client(url, args.token, timeout=args.timeout, open_timeout=args.timeout) as c:
                    await c.start(cid)
                    stored = {t.get("turn_id"): t for t in await c.history()}
            except ServerError as e:
                if e.code != "unknown_conversation":
                    out["check_errors"] += 1
                    out["samples"].append(f"{cid}: {e.code}: {e.message}"[:300])
                    return
                out["conversations_missing"] += 1
                stored = {}
            except Exception as e:  # noqa: BLE001
                out["check_errors"] += 1
                out["samples"].append(f"{cid}: {type(e).__name__}: {e}"[:300])
                return
        for a in acked:
            t = stored.get(a["turn_id"])
            if t is None:
                out["lost"] += 1
                out["samples"].append(f"{cid}: turn {a['turn_id']} ({a['kind']}) acknowledged but missing")
            elif t.get("frames") != a["frames"] or t.get("text") != a["text"]:
                out["altered"] += 1
                out["samples"].append(f"{cid}: turn {a['turn_id']} stored with {t.get('frames')} frames, "
                                      f"{t.get('text')!r:.60}; acknowledged {a['frames']} frames, {a['text']!r:.60}")
            else:
                out["present"] += 1
        out["unacknowledged_stored"] += len(set(stored) - {a["turn_id"] for a in acked})

    await asyncio.gather(*(check(cid) for cid in col.conversations))
    out["samples"] = out["samples"][:10]
    out["turns"] = col.acks  # every acknowledged turn (JSON only)
    return out


# ---------------------------------------------------------------------------------------------- report ---
def mode_stats(recs: list[dict[str, Any]], errors: list[dict[str, Any]], sent: int) -> dict[str, Any]:
    def vals(key: str) -> list[float]:
        return [float(r[key]) for r in recs if isinstance(r.get(key), int | float)]

    kinds = Counter(e["kind"] for e in errors)
    ttfa = vals("ttfa_ms_client")
    return {
        "requests": sent, "ok": len(recs), "overloaded": kinds["overloaded"], "killed": kinds["killed"],
        "failed": kinds["failure"],
        "failures": dict(Counter(e["code"] for e in errors if e["kind"] == "failure")),
        "killed_by_code": dict(Counter(e["code"] for e in errors if e["kind"] == "killed")),
        "ttfa_ms_client": {**percentiles(ttfa), "max": max(ttfa, default=None)},
        "ttfa_ms_server": percentiles(vals("ttfa_ms_server")),
        "rtf_server": percentiles(vals("rtf_server")), "rtf_client": percentiles(vals("rtf_client")),
        "realtime_ok_fraction": (sum(x < 1.0 for x in vals("rtf_client")) / len(vals("rtf_client"))
                                 if vals("rtf_client") else None),
        "audio_turn_ms": percentiles(vals("audio_turn_ms")),
        "audio_s": float(sum(vals("audio_s"))), "frames": int(sum(vals("frames"))),
    }


ENGINE_COUNTER = re.compile(r"^csm_engine_(frames|rows|prefills)_total\s+([0-9.e+]+)$", re.M)


def engine_counts(args: argparse.Namespace) -> dict[str, float] | None:
    """The servers' engine counters from /metrics, summed over the replicas (None when one has none: a server
    from before they existed)."""
    total: dict[str, float] = {}
    for url in urls(args):
        req = urllib.request.Request(http_url(url, "/metrics"),
                                     headers={"Authorization": f"Bearer {args.token}"} if args.token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        found = {name: float(v) for name, v in ENGINE_COUNTER.findall(text)}
        if not found:
            return None
        for name, v in found.items():
            total[name] = total.get(name, 0.0) + v
    return total


def engine_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Frames, rows and prefill calls during the load; rows / frames is the mean row bucket."""
    if not before or not after:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    d["rows_per_frame"] = d["rows"] / d["frames"] if d.get("frames") else None
    return d


def summarize(args: argparse.Namespace, col: Collector, env: dict[str, Any], load: dict[str, Any],
              spawn: dict[str, Any] | None, durability: dict[str, Any] | None,
              engine: dict[str, Any] | None = None) -> dict[str, Any]:
    recs = col.records
    counts = Counter(args.mix[i % len(args.mix)] for i in range(args.clients))
    modes = {m: mode_stats([r for r in recs if r["mode"] == m], [e for e in col.errors if e["mode"] == m],
                           counts[m] * args.requests) for m in args.mix if counts[m]}
    overall = mode_stats(recs, col.errors, args.clients * args.requests)
    wall_s = (col.last_done - col.first_connect) if (col.last_done and col.first_connect) else None
    failures = overall["failed"]
    lost = None if durability is None else (durability["lost"] + durability["altered"]
                                            + durability["conversations_missing"] + durability["check_errors"])
    return {
        "url": args.url, "replicas": len(urls(args)), "clients": args.clients, "requests_per_client": args.requests, "mix": list(args.mix),
        "clients_per_mode": dict(counts), "max_audio_ms": args.max_audio_ms, "text": args.text,
        "server": {k: col.server.get(k) for k in ("model", "protocol", "num_codebooks", "limits")},
        "requests_total": overall["requests"], "requests_ok": overall["ok"],
        "requests_failed": overall["requests"] - overall["ok"],  # every request without a good answer
        "failures": failures, "overloaded": overall["overloaded"], "killed": overall["killed"],
        "errors": dict(Counter(e["code"] for e in col.errors)), "error_samples": col.errors[:10],
        "errors_all": col.errors,
        "modes": modes, "overall": overall,
        "ttfa_ms_client": overall["ttfa_ms_client"], "ttfa_ms_server": overall["ttfa_ms_server"],
        "rtf_server": overall["rtf_server"], "rtf_client": overall["rtf_client"],
        "realtime_ok_fraction": overall["realtime_ok_fraction"],
        "stop_reasons": dict(Counter(str(r["stop_reason"]) for r in recs if r["mode"] != "http")),
        "frames_total": overall["frames"], "audio_s_total": overall["audio_s"], "wall_s": wall_s,
        "throughput_audio_s_per_s": (overall["audio_s"] / wall_s) if wall_s else None,
        "load_s": load.get("load_s"), "spawn": spawn, "durability": durability, "engine": engine,
        "ok": failures == 0 and not lost,
        "environment": env,
    }


def _f(x: Any, unit: str = "", digits: int = 1) -> str:
    return f"{x:.{digits}f}{unit}" if isinstance(x, int | float) else "-"


def print_summary(s: dict[str, Any]) -> None:
    server = s["server"]
    print(f"\nserver: model {server.get('model') or '?'!r}, {server.get('num_codebooks') or '?'} codebooks")
    print(f"{'mode':6} {'ok/total':>9} {'overld':>6} {'killed':>6} {'failed':>6}  {'TTFA p50':>9} {'p95':>9}"
          f"  {'server p50':>10}  {'rtf p50':>7} {'p95':>6}  audio s")
    for name, m in [*s["modes"].items(), ("all", s["overall"])]:
        tc, ts, rc = m["ttfa_ms_client"], m["ttfa_ms_server"], m["rtf_client"]
        print(f"{name:6} {m['ok']:>4}/{m['requests']:<4} {m['overloaded']:>6} {m['killed']:>6} {m['failed']:>6}  "
              f"{_f(tc['p50'], ' ms'):>9} {_f(tc['p95'], ' ms'):>9}  {_f(ts['p50'], ' ms'):>10}  "
              f"{_f(rc['p50'], '', 2):>7} {_f(rc['p95'], '', 2):>6}  {m['audio_s']:.1f}")
    audio = s["modes"].get("audio")
    if audio and audio["audio_turn_ms"]["p50"] is not None:
        at = audio["audio_turn_ms"]
        print(f"audio turns (audio.start -> turn.stored): p50 {_f(at['p50'], ' ms')}, p95 {_f(at['p95'], ' ms')}")
    print("(TTFA: client-measured, request sent -> first audio; rtf: client wall time / audio time, < 1 keeps up)")
    if s["failures"]:
        print(f"FAILURES: {({k: v['failures'] for k, v in s['modes'].items() if v['failures']})}")
        for e in [e for e in s["error_samples"] if e["kind"] == "failure"][:5]:
            print(f"  {e['mode']} client {e['client']} request {e['request']}: {e['code']}: {e['message']}")
    print(f"audio generated: {s['audio_s_total']:.1f} s in {_f(s['wall_s'], ' s')} wall -> "
          f"{_f(s['throughput_audio_s_per_s'], ' audio s per s', 2)}")
    if e := s["engine"]:
        print(f"engine: {e['frames']:.0f} frames, {e['rows']:.0f} rows computed "
              f"({_f(e['rows_per_frame'], ' rows per frame', 2)}), {e['prefills']:.0f} prefill calls for "
              f"{s['requests_total']} requests")
    sp = s["spawn"]
    if sp:
        mem = sp["memory"]
        print(f"server memory (VmRSS): before {_f(mem['before_rss_mb'], ' MB', 0)}, after "
              f"{_f(mem['after_rss_mb'], ' MB', 0)} ({mem['after_when']}), max sampled under load "
              f"{_f(mem['load_max_rss_mb'], ' MB', 0)}, peak since start (VmHWM, warmup included) "
              f"{_f(mem['peak_hwm_mb'], ' MB', 0)}")
        k = sp.get("kill")
        if k:
            print(f"kill -9 at {k['after_s']:.1f} s into the load with {k['in_flight']} requests in flight; "
                  f"errors it caused: {s['killed']} (not failures)")
        elif sp.get("kill9_after") is not None:
            print(f"kill -9 did not happen mid-load: the load ended after {_f(s['load_s'], ' s')}, before "
                  f"--kill9-after {sp['kill9_after']} s (lower it)")
        print(f"restart on the same database (after a final SIGKILL): ready in {_f(sp['restart_s'], ' s')}")
    d = s["durability"]
    if d:
        print(f"durability: {d['acknowledged']} acknowledged turns in {d['conversations']} conversations: "
              f"{d['present']} present, {d['lost']} lost, {d['altered']} altered"
              + (f", {d['conversations_missing']} conversations missing" if d["conversations_missing"] else "")
              + (f", {d['check_errors']} check errors" if d["check_errors"] else "")
              + f" ({d['unacknowledged_stored']} more stored without an acknowledgement)")
        for line in d["samples"][:5]:
            print(f"  {line}")
    print(f"result: {'PASS' if s['ok'] else 'FAIL'}")


# ------------------------------------------------------------------------------------------------ main ---
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("CSM_JAX_URL") or DEFAULT_URL,
                   help="a running server's WebSocket URL, or several replicas' comma-separated (client i uses "
                        "replica i mod N; ignored with --spawn)")
    p.add_argument("--token", default=os.environ.get("CSM_JAX_TOKEN") or None)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, in a row (default %(default)s)")
    p.add_argument("--mix", default="say,audio,http", help="comma-separated modes from say,audio,http; client i "
                                                           "uses mix[i %% len(mix)] (default %(default)s)")
    p.add_argument("--max-audio-ms", type=int, default=2000, help="per response (default %(default)s)")
    p.add_argument("--text", default="Hello there, how are you today?")
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, help="base seed (request k of the test uses seed + k); default: unseeded")
    p.add_argument("--audio-file", type=Path, default=DEFAULT_AUDIO, help="user audio turns (default: %(default)s)")
    p.add_argument("--audio-transcript", help="their transcript (default: the text of the default file, else none)")
    p.add_argument("--audio-speaker", type=int, default=1)
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread the client starts over this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each server event")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the JSON summary to FILE (the text report is printed too); alone: print only JSON")
    s = p.add_argument_group("spawned server")
    s.add_argument("--spawn", action="store_true", help="start the server (default model, port 0) for the test")
    s.add_argument("--db", type=Path, help="its database (default: a fresh one in a temporary directory)")
    s.add_argument("--cache-dir", type=Path, default=Path("~/.cache/csm_jax/xla").expanduser(),
                   help="persistent XLA compilation cache (default %(default)s)")
    s.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for the server, repeatable (e.g. engine.batch_size=8)")
    s.add_argument("--replicas", type=int, default=1, help="servers to spawn on one database (needs --server-arg "
                   "storage.url=postgresql://...; client i uses replica i mod N; the durability check reads every "
                   "conversation through replica 0)")
    s.add_argument("--kill9-after", type=float, metavar="SECONDS",
                   help="SIGKILL the server this many seconds into the load (then restart and check every turn)")
    s.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the server to start")
    s.add_argument("--keep", action="store_true", help="keep the temporary directory (database, server logs)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    args.mix = [m.strip() for m in args.mix.split(",") if m.strip()]
    if not args.mix or any(m not in MODES for m in args.mix):
        p.error(f"--mix takes a comma-separated list of {', '.join(MODES)}")
    if args.kill9_after is not None and not args.spawn:
        p.error("--kill9-after needs --spawn (the test must own the server it kills)")
    bad = [a for a in args.server_arg if "=" not in a]
    if bad:
        p.error(f"--server-arg takes key=value, got {bad}")
    if args.audio_transcript is None:
        args.audio_transcript = DEFAULT_AUDIO_TRANSCRIPT if args.audio_file.resolve() == DEFAULT_AUDIO else ""
    return args


def load_audio(path: Path) -> tuple[np.ndarray, int]:
    """The file as int16 mono samples (downmixed) and its sample rate."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    return np.clip(np.round(mono.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16), int(rate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replicas < 1 or (args.replicas > 1 and not (args.spawn and any(
            a.startswith("storage.url=") for a in args.server_arg))):
        print("--replicas N > 1 needs --spawn and a shared database: --server-arg storage.url=postgresql://...",
              file=sys.stderr)
        return 2
    only_json = args.json == "-"
    out = (lambda *a: None) if only_json else print
    audio, audio_rate = load_audio(args.audio_file) if "audio" in args.mix else (np.zeros(0, np.int16), 24_000)
    env = environment()
    if not only_json:
        print_environment(env)
    workdir: Path | None = None
    server: SpawnedServer | None = None
    extras: list[SpawnedServer] = []  # --replicas beyond the first
    spawn: dict[str, Any] | None = None
    durability: dict[str, Any] | None = None
    ok_exit = False
    try:
        if args.spawn:
            workdir = Path(tempfile.mkdtemp(prefix="csm-load-test-"))
            db = args.db or workdir / "conversations.db"
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            server = SpawnedServer(workdir, db, args.cache_dir, args.server_arg, "load")
            out(f"starting the server (default model, database {db}, XLA cache {args.cache_dir}; the first start "
                f"compiles, minutes on a few cores)\n  python -m serve {' '.join(server.overrides)}")
            if raised := raised_limits(args.server_arg):
                out(f"  note: passing {' '.join(raised)}: every client of this test connects from 127.0.0.1, and "
                    "the per-address request budget meant for real clients would refuse them as one client")
            try:
                server.start(args.start_timeout)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 1
            args.url = server.ws_url
            for r in range(1, args.replicas):  # more servers on the same database
                extra = SpawnedServer(workdir, db, args.cache_dir, args.server_arg, f"load-{r}")
                extras.append(extra)
                try:
                    extra.start(args.start_timeout)
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    return 1
                out(f"replica {r} ready in {_f(extra.ready_s, ' s')} (pid {extra.pid}), {extra.ws_url}")
                args.url += "," + extra.ws_url
            time.sleep(1.0)  # ready and idle
            before = server.memory() or {}
            out(f"server ready in {_f(server.ready_s, ' s')} (pid {server.pid}), {args.url}, "
                f"VmRSS {_f(before.get('rss_mb'), ' MB', 0)}")
            spawn = {"command": server.cmd, "db": str(db), "workdir": str(workdir), "log": str(server.log_path),
                     "ready_s": server.ready_s, "start_wall_s": server.start_wall_s, "kill9_after": args.kill9_after,
                     "memory": {"before_rss_mb": before.get("rss_mb"), "before_hwm_mb": before.get("hwm_mb")}}
        counts = Counter(args.mix[i % len(args.mix)] for i in range(args.clients))
        out(f"load test: {args.clients} clients ({', '.join(f'{m} {counts[m]}' for m in args.mix)}) x "
            f"{args.requests} requests, max_audio_ms {args.max_audio_ms}, {args.url}")
        col = Collector()
        counts_before = engine_counts(args)
        load = asyncio.run(run_load(args, col, audio, audio_rate, server))
        engine = None if server is not None and server.killed else engine_delta(counts_before, engine_counts(args))
        if server is not None and spawn is not None:
            mem = spawn["memory"]
            if server.killed:
                after, mem["after_when"] = load.get("at_kill") or load.get("last") or {}, "at the kill, under load"
                spawn["kill"] = load.get("kill")
            else:
                after, mem["after_when"] = server.memory() or {}, "after the load"
            samples = load.get("rss_samples_mb") or []
            mem.update(after_rss_mb=after.get("rss_mb"), peak_hwm_mb=after.get("hwm_mb"),
                       load_max_rss_mb=max(samples, default=None), load_samples=len(samples))
            for extra in extras:
                extra.kill9()
            server.kill9()  # a hard kill at the end too: durability is always checked after a kill -9
            out(f"server killed (SIGKILL); restarting it on {db} to check {len(col.acks)} acknowledged turns")
            restarted = SpawnedServer(workdir, db, args.cache_dir, args.server_arg, "restart")
            server = restarted
            t0 = time.perf_counter()
            try:
                restarted.start(args.start_timeout)
            except RuntimeError as e:
                print(f"the restart failed, nothing could be checked: {e}", file=sys.stderr)
                return 1
            spawn["restart_s"] = time.perf_counter() - t0
            spawn["restart_log"] = str(restarted.log_path)
            mem["restart_rss_mb"] = (restarted.memory() or {}).get("rss_mb")
            durability = asyncio.run(verify(restarted.ws_url, args, col))
            restarted.stop()
        summary = summarize(args, col, env, load, spawn, durability, engine)
        ok_exit = bool(summary["ok"])
        if only_json:
            print(json.dumps(summary))
        else:
            print_summary(summary)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1))
                print(f"wrote {args.json}")
    finally:
        for extra in extras:
            extra.kill9()
        if server is not None:
            server.kill9()
        if workdir is not None:
            if args.keep or not ok_exit:
                out(f"kept {workdir} (database, server logs)")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok_exit else 1


if __name__ == "__main__":
    sys.exit(main())
