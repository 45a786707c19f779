"""Smoke test of bench/gpu_bench.py in tiny mode on CPU: it runs end to end, every line it writes is JSON, and
every kind of record is there with finite positive timings (or an explicit reason for a variant this csm_jax
cannot build). The timings themselves are not checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from xla_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_bench.py"


def run_bench(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "gpu_bench.jsonl"
    env = subprocess_env(JAX_PLATFORMS="cpu")  # one CPU device, as the bench is run
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and "kind" in r for r in records)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == records  # stdout carries the same lines
    return proc, records


def positive(record: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = record.get(key)
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, record)


def one(records: list[dict], kind: str, **match: Any) -> dict[str, Any]:
    found = [r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (kind, match, found)
    return found[0]


def test_gpu_bench_tiny(tmp_path: Path) -> None:
    _, records = run_bench(tmp_path, "--variants", "bf16,int8,fp32,bf16_f32")
    errors = [r for r in records if "error" in r]
    assert not errors, errors

    env = one(records, "env")
    assert env["mode"] == "tiny" and env["backend"] == "cpu" and env["args"]["batches"] == [1, 2]
    for phase in ("start", "end"):
        positive(one(records, "bandwidth", phase=phase), "gbps", "sum_f32_gbps", "matvec_bf16_gbps")
    for variant, batches in (("bf16", (1, 2)), ("int8", (1, 2)), ("fp32", (1,))):
        for b in batches:  # the floor is computed for every precision, int8 included (nominal 1 byte/param)
            positive(one(records, "floor", variant=variant, batch=b), "floor_ms", "floor_static_kv_ms",
                     "weight_bytes", "kv_bytes_per_row")
    floors = {r["variant"]: r["weight_bytes"] for r in records if r["kind"] == "floor" and r["batch"] == 1}
    assert floors["fp32"] == 2 * floors["bf16"] == 2 * floors["bf16_f32"] == 4 * floors["int8"]
    positive(one(records, "params", variant="fp32"), "build_s", "n_params", "bytes")
    assert one(records, "params", variant="bf16")["weights_dtype"] == "bfloat16"
    positive(one(records, "codec"), "build_s", "n_params")

    timing = ("median_ms", "min_ms", "p90_ms", "pipelined_ms", "first_call_s", "frames_per_s", "rtf", "floor_ms",
              "floor_ratio")
    for variant, batches in (("bf16", (1, 2)), ("fp32", (1,)), ("bf16_f32", (1, 2))):
        for b in batches:
            r = one(records, "frame", variant=variant, batch=b)
            positive(r, *timing)
            assert r["n"] == 3 and len(r["times_ms"]) == 3
            assert r["compute_dtype"] == {"bf16": "bfloat16", "fp32": "float32", "bf16_f32": "float32"}[variant]
    assert one(records, "params", variant="bf16_f32")["weights_dtype"] == "bfloat16,float32"
    for b in (1, 2):
        r = one(records, "frame", variant="int8", batch=b)
        if "skipped" in r:  # this csm_jax has no int8 weights: the reason is given
            assert "not supported" in r["skipped"], r
        else:
            positive(r, *timing)

    for rows in (30, 250):
        positive(one(records, "ttfa", variant="bf16", prompt_rows=rows), "median_ms", "prefill_ms", "step_ms",
                 "mimi_ms", "first_call_s")
    for b in (1, 2):
        positive(one(records, "mimi_decode", batch=b), "median_ms", "min_ms", "frames_per_s")
        r = one(records, "serving_frame", variant="bf16", batch=b)
        positive(r, "median_ms", "step_ms", "mimi_ms", "frames_per_s", "rtf")

    done = one(records, "summary")
    assert records[-1] is done and done["errors"] == 0 and done["skipped_by_budget"] == []
    positive(done, "wall_s")


def test_gpu_bench_time_budget(tmp_path: Path) -> None:
    """With the budget spent at once, only the environment and the summary run; the rest say why they did not."""
    _, records = run_bench(tmp_path, "--time-budget-s", "0", timeout=120)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "env" and kinds[-1] == "summary"
    skipped = records[1:-1]
    assert skipped and all("time budget" in r["skipped"] for r in skipped), skipped
    assert {r["kind"] for r in skipped} >= {"bandwidth", "floor", "params", "codec"}
    assert len(records[-1]["skipped_by_budget"]) == len(skipped)
