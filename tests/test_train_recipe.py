"""The tiny training recipe through its real Hydra commands: espeak-ng corpus -> prepare -> train -> evaluate,
exact resume after `kill -9`, a multirun sweep, and clear errors for bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from recipe_outputs import losses, result
from xla_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env()  # one CPU device, as a user's run


def command(script: str, *overrides: str) -> list[str]:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra flags (-m) go before the overrides
    return [sys.executable, str(ROOT / "train" / f"{script}.py"), *flags, "experiment=tiny_cpu",
            "train.progress=false", *(o for o in overrides if not o.startswith("-"))]


def run(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(script, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A corpus made and prepared once by the recipe's own commands."""
    root = tmp_path_factory.mktemp("recipe")
    p = {"data": root / "data", "runs": root / "runs"}
    p["overrides"] = (f"paths.data={p['data']}", f"paths.runs={p['runs']}")
    run("make_corpus", *p["overrides"])
    run("prepare", *p["overrides"])
    return p


@pytest.fixture(scope="module")
def trained(paths: dict[str, Any]) -> dict[str, Any]:
    """The recipe's 60-step run, every step's loss logged: its summary (also the uninterrupted reference of the
    kill -9 test)."""
    return result(run("train", *paths["overrides"], "train.log_every=1"))


def test_tiny_recipe_trains_end_to_end_and_the_loss_falls(paths: dict[str, Any], trained: dict[str, Any]) -> None:
    summary = trained
    workdir = Path(summary["workdir"])
    assert summary["step"] == 60 and not summary["resumed"]
    trace = losses(workdir)
    first, last = trace[min(trace)], trace[max(trace)]
    assert last < 0.5 * first, trace  # the training loss falls clearly
    assert (workdir / "config.json").is_file() and list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    evaluated = result(run("evaluate", *paths["overrides"], "train.log_every=1", "evaluate.samples=2",
                           "evaluate.max_audio_ms=400"))  # the same overrides name the same run
    assert evaluated["step"] == summary["best_step"] and len(evaluated["loss"]["cb_loss"]) == 8
    assert evaluated["loss"]["c0_loss"] == pytest.approx(summary["eval"]["eval/c0_loss"], rel=1e-4)
    assert all(0 <= w <= 2 for w in (evaluated["wer_generated"], evaluated["wer_codec_resynthesis"]))
    out = Path(evaluated["dir"])
    assert sorted(p.name for p in out.glob("*.wav")) == ["real_0.wav", "real_1.wav", "sample_0.wav", "sample_1.wav"]


def test_kill_9_after_a_checkpoint_resumes_exactly(paths: dict[str, Any], trained: dict[str, Any]) -> None:
    """Killed after a checkpoint and resumed, a run's losses equal the uninterrupted 60-step run's bit for bit (the
    learning-rate schedule pinned to its 60 steps; checkpoints and evaluation do not touch the training stream)."""
    reference = losses(Path(trained["workdir"]))
    settings = ("train.max_steps=16", "optim.decay_steps=60", "train.log_every=1", "train.checkpoint_every=4",
                "train.eval_every=0")
    runs = paths["runs"] / "killed"
    args = command("train", f"paths.data={paths['data']}", f"paths.runs={runs}", *settings)
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    checkpoints: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoints = [p for p in runs.glob("*/*/checkpoints/*") if p.name.isdigit() and int(p.name) >= 8]
        if checkpoints:
            break
        time.sleep(0.05)
    assert checkpoints, "no checkpoint at step >= 8 appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workdir = checkpoints[0].parents[1]
    before = losses(workdir)
    assert max(before) < 16  # really interrupted

    resumed = result(run("train", f"paths.data={paths['data']}", f"paths.runs={runs}", *settings))
    assert resumed["resumed"] and resumed["start_step"] >= 8 and resumed["step"] == 16
    after = losses(workdir)
    for step in range(resumed["start_step"] + 1, 17):
        assert after[step] == reference[step], (step, after[step], reference[step])


def test_multirun_sweep_gets_one_workdir_per_setting(paths: dict[str, Any]) -> None:
    run("train", "-m", *paths["overrides"], "optim.learning_rate=1e-3,2e-3", "train.max_steps=2",
        "train.eval_every=0")
    dirs = sorted(p for p in (paths["runs"] / "tiny_espeak_tiny").iterdir() if "learning_rate" in p.name)
    assert [d.name for d in dirs] == [f"experiment=tiny_cpu,optim.learning_rate={lr},train.eval_every=0"
                                      for lr in ("0.001", "0.002")]
    for d in dirs:
        assert max(losses(d)) == 2 and (d / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("case", ["unknown_top_key", "unknown_nested_key", "missing_audio", "corrupt_manifest",
                                  "empty_corpus", "missing_manifest"])
def test_bad_inputs_fail_with_clear_errors(case: str, paths: dict[str, Any], tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    overrides = [f"paths.data={tmp_path}", f"paths.runs={tmp_path / 'runs'}", f"data.manifest={manifest}"]
    script, expect = "prepare", ""
    if case == "unknown_top_key":
        script, overrides, expect = "train", [*paths["overrides"], "+bogus=1"], "unknown config key(s) ['bogus']"
    elif case == "unknown_nested_key":
        script, overrides, expect = "train", [*paths["overrides"], "+optim.bogus=1"], "optim.bogus"
    elif case == "missing_audio":
        manifest.write_text(json.dumps({"audio": "nope.wav", "text": "hi", "speaker": 0, "conversation": "c",
                                        "turn": 0}) + "\n")
        expect = "nope.wav"
    elif case == "corrupt_manifest":
        manifest.write_text('{"audio": "a.wav", "text": \n')
        expect = "manifest.jsonl:1"
    elif case == "empty_corpus":
        manifest.write_text("\n")
        expect = "empty corpus"
    else:
        expect = "manifest.jsonl"
    proc = run(script, *overrides, check=False)
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr, (proc.stdout[-2000:], proc.stderr[-2000:])
