"""Multi-process training on CPU: 2 processes x 4 devices (jax.distributed, a data=4 x fsdp=2 mesh across both)
train the tiny CSM with the same losses as 1 process x 8 devices; their checkpoint resumes in 1 process with the
same next-step loss; bad distributed settings fail fast with clear messages instead of hanging."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from distributed_worker import CFG, CONFIG, batches
from xla_env import subprocess_env

from csm_jax.training.mesh import DistributedConfig
from csm_jax.training.metrics import read_jsonl
from csm_jax.training.synthetic import ListLoader
from csm_jax.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
NAMES = ("train/loss", "train/c0_loss", "train/depth_loss", "train/grad_norm", "train/lr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, max_steps: int, **distributed) -> subprocess.Popen:
    """A worker process with 4 CPU devices."""
    env = subprocess_env(4, JAX_PLATFORMS="cpu")
    args = {"workdir": str(workdir), "max_steps": max_steps, "distributed": {"enabled": True, **distributed}}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; kills them all (and fails) past `timeout` seconds."""
    deadline, out = time.monotonic() + timeout, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"distributed worker(s) still running after {timeout} s")
    return out


def _losses(workdir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r}


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    """(a) 3 steps on 2 processes x 4 devices == 3 steps on 1 process x 8 devices (rtol 1e-5), metrics written
    once (process 0); (b) the 2-process checkpoint (shared dir) resumes here, 1 process x 8 devices, and step 4
    equals step 4 of an uninterrupted 1-process run."""
    assert jax.process_count() == 1 and jax.device_count() == 8
    shared = tmp_path / "two_process"
    address = f"127.0.0.1:{_free_port()}"
    procs = [_launch(shared, 3, coordinator_address=address, num_processes=2, process_id=i,
                     initialization_timeout=60) for i in range(2)]
    results = _finish(procs, timeout=300)
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{stderr[-4000:]}"
        assert json.loads(stdout.strip().splitlines()[-1]) == {"process": i, "processes": 2, "devices": 8,
                                                                "step": 3, "start_step": 0}
    assert len(read_jsonl(shared / "metrics.jsonl")) == 3  # one record per step: only process 0 writes
    assert sorted(p.name for p in (shared / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]

    reference = train(dataclasses.replace(CONFIG, max_steps=4), CFG, ListLoader(batches()),
                      workdir=tmp_path / "one_process")
    assert reference["step"] == 4
    resumed = train(dataclasses.replace(CONFIG, max_steps=4), CFG, ListLoader(batches()), workdir=shared)
    assert resumed["resumed"] and resumed["start_step"] == 3 and resumed["step"] == 4

    ref, got = _losses(tmp_path / "one_process"), _losses(shared)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    diffs = {}
    for step in ref:
        for name in NAMES:
            np.testing.assert_allclose(got[step][name], ref[step][name], rtol=1e-5, err_msg=f"{step} {name}")
        diffs[step] = abs(got[step]["train/loss"] - ref[step]["train/loss"])
    print("max |loss(2x4) - loss(1x8)| per step (4: resumed in 1 process):", diffs)
    assert ref[3]["train/loss"] < ref[1]["train/loss"]


def test_bad_settings_fail_fast_with_clear_errors(tmp_path):
    """(c) malformed/out-of-range settings are rejected before JAX is touched; a missing process or an unreachable
    coordinator ends the process within the short initialization timeout instead of hanging."""
    with pytest.raises(ValueError, match=r"process_id=2 is out of range for num_processes=2 \(ids are 0..1\)"):
        DistributedConfig(enabled=True, coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
    for address in ("127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":1234"):
        with pytest.raises(ValueError, match=r"coordinator_address must be HOST:PORT \(port 1-65535\)"):
            DistributedConfig(enabled=True, coordinator_address=address)
    with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
        DistributedConfig(enabled=True, num_processes=0)
    with pytest.raises(ValueError, match="process_id must be an int >= 0"):
        DistributedConfig(enabled=True, process_id="1")
    with pytest.raises(ValueError, match="initialization_timeout must be an int >= 1"):
        DistributedConfig(enabled=True, initialization_timeout=0)

    t0 = time.monotonic()
    alone = _launch(tmp_path / "alone", 1, coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=2,
                    process_id=0, initialization_timeout=5)  # process 1 never starts
    unreachable = _launch(tmp_path / "unreachable", 1, coordinator_address=f"127.0.0.1:{_free_port()}",
                          num_processes=2, process_id=1, initialization_timeout=3)  # nothing listens there
    (code0, _, err0), (code1, _, err1) = _finish([alone, unreachable], timeout=120)
    elapsed = time.monotonic() - t0
    assert code0 != 0 and "process 0 of 2 joining coordinator" in err0 and "DEADLINE_EXCEEDED" in err0, err0[-3000:]
    assert code1 != 0, err1[-3000:]
    assert "RuntimeError: jax.distributed: coordinator 127.0.0.1:" in err1 and "not reachable within 3 s" in err1, \
        err1[-3000:]
    print(f"bad settings: both processes ended in {elapsed:.1f} s")
    assert elapsed < 90
