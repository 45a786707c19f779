"""Training metrics: TensorBoard event files (tensorboardX) and a JSON-lines log, written by process 0; an optional
`jax.profiler` trace of a step range."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalars as floats; vectors as `name/i` entries (e.g. cb_loss/0 .. cb_loss/K-1)."""
    flat = {}
    for name, value in metrics.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            flat[prefix + name] = float(arr)
        else:
            for i, x in enumerate(arr.reshape(-1)):
                flat[f"{prefix}{name}/{i}"] = float(x)
    return flat


class MetricsWriter:
    """`write(step, metrics)` appends `{"step", "time", **metrics}` to `<workdir>/metrics.jsonl` and adds
    TensorBoard scalars under `<workdir>/tensorboard`. Non-zero processes write nothing."""

    def __init__(self, workdir: str | Path, tensorboard: bool = True, jsonl: bool = True,
                 enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        workdir = Path(workdir)
        self.jsonl_path = workdir / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.jsonl_path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
        flat = flatten_metrics(metrics, prefix)
        if not self.enabled:
            return flat
        if self._jsonl is not None:
            record = {"step": int(step), "time": time.time()} | {
                k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in flat.items():
                self._tb.add_scalar(name, value, int(step))
            self._tb.flush()
        return flat

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepProfiler:
    """Traces steps [start, stop) with `jax.profiler` into `logdir` (view with TensorBoard's profile plugin or
    Perfetto). Call `before(step)` before running step `step` (0-based count of updates done) and `after(step, out)`
    after it with the step's outputs."""

    def __init__(self, logdir: str | Path, start: int, stop: int) -> None:
        if not 0 <= start < stop:
            raise ValueError(f"profile range [{start}, {stop}) is empty")
        self.logdir, self.start, self.stop = str(logdir), start, stop
        self.active = False

    def before(self, step: int) -> None:
        if step == self.start and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs: Any = None) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
