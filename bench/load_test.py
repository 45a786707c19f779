"""Load test for a RUNNING csm-jax conversation server: N concurrent WebSocket clients.

Run from the repository root, with the server already up (`python -m csm_jax.serving ...`):

    .venv/bin/python bench/load_test.py                                   # 16 clients x 2 requests, 2000 ms
    .venv/bin/python bench/load_test.py --url ws://HOST:8765/ws --clients 32 --requests 4 --max-audio-ms 4000
    .venv/bin/python bench/load_test.py --clients 3 --requests 1 --max-audio-ms 400 --json   # machine-readable

Each client (one connection, one conversation) connects, starts a conversation and says `--text` `--requests`
times in a row (its conversation grows, so later prompts carry the earlier turns). All clients start together
(or spread over `--ramp-s`). Reported:

- errors: every request that did not end in `response.done` (a server `error` event, a refused connection, a
  timeout), by code, plus responses whose audio does not match `done.frames` (code `frames_mismatch`);
- time to first audio measured by the client (sending `say` -> first binary frame), p50/p95, next to the
  server's own `ttfa_ms` (request received -> first frame sent);
- real-time factor: the server's `rtf` (generation time / audio time, < 1 is faster than real time) p50/p95, and
  the client-observed one (send -> response.done wall time / audio time) p50/p95, with the share of requests that
  kept up with real time (client rtf < 1: a listener would hear no gap at the end);
- total audio seconds generated, the test's wall time (first connect -> last response.done) and the aggregate
  throughput (audio seconds per wall second, i.e. how many real-time streams the server sustains).

Exit status 0 when no request failed, 1 otherwise. Run it on a machine other than the server's, or mind that
the clients take CPU time from the server (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import websockets

from csm_jax.client import DEFAULT_URL, Client, ServerError

FRAME_SAMPLES = 1920


def environment() -> dict[str, Any]:
    """The client side's environment. (bench_env.environment describes the JAX/torch process it runs in; here the
    model runs in the server, so only the client's versions, cores and load are relevant.)"""
    return {
        "python": platform.python_version(), "websockets": websockets.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_1min_start": os.getloadavg()[0],
    }


def print_environment(env: dict[str, Any]) -> None:
    load = env["loadavg_1min_start"]
    print(f"python {env['python']} | websockets {env['websockets']} | numpy {env['numpy']} | "
          f"cpus: {env['cpu_count']} (usable {env['cpus_usable']})")
    print(f"load average (1 min) at start: {load:.2f}" + ("  <- other processes are busy; timings will be noisy"
                                                         if load > 0.5 else ""))


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95)) -> dict[str, float | None]:
    """{"p50": ..., "p95": ...} with numpy percentiles (None where there are no values)."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(np.asarray(values, np.float64), qs), strict=True)}


class Collector:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.server: dict[str, Any] = {}
        self.first_connect: float | None = None
        self.last_done: float | None = None

    def error(self, client: int, request: int | None, code: str, message: str) -> None:
        self.errors.append({"client": client, "request": request, "code": code, "message": message[:300]})


async def run_client(i: int, args: argparse.Namespace, col: Collector) -> None:
    if args.ramp_s > 0 and args.clients > 1:
        await asyncio.sleep(args.ramp_s * i / (args.clients - 1))
    done_requests = 0
    t_connect = time.perf_counter()
    col.first_connect = min(t_connect, col.first_connect or t_connect)
    try:
        async with Client(args.url, args.token, timeout=args.timeout) as c:
            col.server = col.server or c.ready
            await c.start()
            for j in range(args.requests):
                seed = None if args.seed is None else args.seed + i * args.requests + j
                t0 = time.perf_counter()
                try:
                    r = await c.say(args.text, args.speaker, max_audio_ms=args.max_audio_ms, seed=seed,
                                    temperature=args.temperature, top_k=args.top_k)
                except ServerError as e:
                    col.error(i, j, e.code, e.message)
                    done_requests += 1
                    continue
                done_requests += 1
                t1 = time.perf_counter()
                col.last_done = max(t1, col.last_done or t1)
                d = r.done
                if len(r.audio) != FRAME_SAMPLES * int(d.get("frames", -1)) or r.frames != d.get("frames"):
                    col.error(i, j, "frames_mismatch", f"{r.frames} frames / {len(r.audio)} samples received, "
                                                       f"response.done says {d.get('frames')} frames")
                    continue
                wall_s = (t1 - t0)
                col.records.append({
                    "client": i, "request": j, "frames": r.frames, "audio_s": r.audio_s, "wall_s": wall_s,
                    "ttfa_ms_client": r.ttfa_ms_client, "ttfa_ms_server": d.get("ttfa_ms"), "rtf_server": d.get("rtf"),
                    "rtf_client": wall_s / r.audio_s if r.audio_s > 0 else None, "stop_reason": d.get("stop_reason"),
                    "context_turns": r.started.get("context_turns"),
                })
    except ServerError as e:  # session.start refused
        col.error(i, done_requests, e.code, e.message)
        done_requests += 1
    except Exception as e:  # noqa: BLE001 - connection refused / closed / timeout: counted, the others go on
        col.error(i, done_requests, type(e).__name__, str(e) or repr(e))
        done_requests += 1
    for j in range(done_requests, args.requests):  # requests never sent because the connection failed
        col.error(i, j, "not_sent", "the client's connection had failed")


def summarize(args: argparse.Namespace, col: Collector, env: dict[str, Any]) -> dict[str, Any]:
    recs = col.records
    total = args.clients * args.requests

    def vals(key: str) -> list[float]:
        return [float(r[key]) for r in recs if isinstance(r.get(key), int | float)]

    audio_s = float(sum(vals("audio_s")))
    wall_s = (col.last_done - col.first_connect) if (col.last_done and col.first_connect) else None
    rtf_client = vals("rtf_client")
    return {
        "url": args.url, "clients": args.clients, "requests_per_client": args.requests,
        "max_audio_ms": args.max_audio_ms, "text": args.text,
        "server": {k: col.server.get(k) for k in ("model", "protocol", "num_codebooks", "limits")},
        "requests_total": total, "requests_ok": len(recs), "requests_failed": total - len(recs),
        "errors": dict(Counter(e["code"] for e in col.errors)), "error_samples": col.errors[:10],
        "ttfa_ms_client": {**percentiles(vals("ttfa_ms_client")), "max": max(vals("ttfa_ms_client"), default=None)},
        "ttfa_ms_server": percentiles(vals("ttfa_ms_server")),
        "rtf_server": percentiles(vals("rtf_server")),
        "rtf_client": percentiles(rtf_client),
        "audio_per_wall_client": percentiles([1.0 / x for x in rtf_client if x > 0], (50, 5)),
        "realtime_ok_fraction": (sum(x < 1.0 for x in rtf_client) / len(rtf_client)) if rtf_client else None,
        "stop_reasons": dict(Counter(str(r["stop_reason"]) for r in recs)),
        "frames_total": int(sum(vals("frames"))), "audio_s_total": audio_s, "wall_s": wall_s,
        "throughput_audio_s_per_s": (audio_s / wall_s) if wall_s else None,
        "environment": env,
    }


def _f(x: Any, unit: str = "", digits: int = 1) -> str:
    return f"{x:.{digits}f}{unit}" if isinstance(x, int | float) else "-"


def print_summary(s: dict[str, Any]) -> None:
    server = s["server"]
    print(f"\nserver: model {server.get('model') or '?'!r}, protocol {server.get('protocol') or '?'}, "
          f"{server.get('num_codebooks') or '?'} codebooks, limits {server.get('limits') or {}}")
    print(f"requests: {s['requests_ok']}/{s['requests_total']} ok, {s['requests_failed']} failed"
          + (f"  errors: {s['errors']}" if s["errors"] else ""))
    for e in s["error_samples"][:5]:
        print(f"  client {e['client']} request {e['request']}: {e['code']}: {e['message']}")
    tc, ts = s["ttfa_ms_client"], s["ttfa_ms_server"]
    print(f"time to first audio (client): p50 {_f(tc['p50'], ' ms')}, p95 {_f(tc['p95'], ' ms')}, "
          f"max {_f(tc['max'], ' ms')}   (server ttfa_ms: p50 {_f(ts['p50'], ' ms')}, p95 {_f(ts['p95'], ' ms')})")
    rs, rc = s["rtf_server"], s["rtf_client"]
    ok = s["realtime_ok_fraction"]
    print(f"real-time factor (generation / audio time; < 1 is faster than real time): server p50 "
          f"{_f(rs['p50'], '', 3)}, p95 {_f(rs['p95'], '', 3)}; client-observed p50 {_f(rc['p50'], '', 3)}, p95 "
          f"{_f(rc['p95'], '', 3)}; {_f(None if ok is None else 100 * ok, '%', 0)} of requests kept up")
    apw = s["audio_per_wall_client"]
    print(f"client-observed audio seconds / wall seconds per request: p50 {_f(apw['p50'], 'x', 2)}, "
          f"slowest 5% {_f(apw['p5'], 'x', 2)}")
    print(f"audio generated: {s['audio_s_total']:.1f} s ({s['frames_total']} frames) in {_f(s['wall_s'], ' s', 1)} "
          f"wall -> aggregate throughput {_f(s['throughput_audio_s_per_s'], ' audio s per s', 2)}; "
          f"stop reasons {s['stop_reasons']}")


async def run(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    col = Collector()
    await asyncio.gather(*(run_client(i, args, col) for i in range(args.clients)))
    return summarize(args, col, env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("CSM_JAX_URL") or DEFAULT_URL)
    p.add_argument("--token", default=os.environ.get("CSM_JAX_TOKEN") or None)
    p.add_argument("--clients", type=int, default=16, help="concurrent connections (default %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="say requests per client, in a row (default %(default)s)")
    p.add_argument("--max-audio-ms", type=int, default=2000, help="per response (default %(default)s)")
    p.add_argument("--text", default="Hello there, how are you today?")
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, help="base seed (request k of the test uses seed + k); default: unseeded")
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread the client starts over this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each server event")
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    if not args.json:
        print(f"load test: {args.clients} clients x {args.requests} requests, max_audio_ms {args.max_audio_ms}, "
              f"{args.url}")
    env = environment()
    if not args.json:
        print_environment(env)
    summary = asyncio.run(run(args, env))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0 if summary["requests_failed"] == 0 and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
