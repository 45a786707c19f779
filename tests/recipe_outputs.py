"""Reading what a `train/` recipe command leaves: its JSON result line and its metrics log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The recipe's result: the JSON object on the last line of stdout."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(workdir: Path) -> dict[int, float]:
    """step -> train loss, the last record of each step (a resumed run logs re-run steps again)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out
