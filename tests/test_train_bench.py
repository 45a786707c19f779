"""Smoke test of bench/train_bench.py: the tiny size runs end to end, both sides train on the same frames, and the
first step's losses and gradient norm agree (the timings themselves are not checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from xla_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "train_bench.json"
    env = subprocess_env()  # one CPU device, as the bench is run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--size", "tiny", "--steps", "2", "--probe", "1",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert math.isfinite(r["ratio"]) and r["ratio"] > 0
    for side in ("hf", "jax"):
        assert len(r["results"][side]["times_ms"]) == 2
        assert math.isfinite(r["results"][side]["frames_per_s"]) and r["results"][side]["frames_per_s"] > 0
    assert r["hf_attention"] in ("eager", "sdpa")
    first = r["loss_check"]["first"]
    assert first["rel_diff"]["c0_loss"] < 1e-4, first
    assert first["rel_diff"]["depth_loss"] < 1e-4, first  # same depth-decoder frames on both sides
    assert first["rel_diff"]["grad_norm"] < 1e-3, first
    assert r["loss_check"]["last"]["rel_diff"]["loss"] < 1e-3, r["loss_check"]["last"]
    assert r["batch"]["depth_frames"] == math.ceil(r["batch"]["batch"] * r["batch"]["seq"] / 16)
    assert 0 < r["batch"]["target_frames"] < r["batch"]["batch"] * r["batch"]["seq"]
