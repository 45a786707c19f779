"""Helpers shared by the benchmark scripts: the environment header and PASS/MISS verdicts."""

from __future__ import annotations

import os
import platform

import jax
import torch
import transformers


def print_environment() -> float:
    """Print versions, cores and the load average (which tells whether the timings can be trusted); return the
    1-minute load average."""
    print(
        f"python {platform.python_version()} | jax {jax.__version__} ({jax.devices()[0].device_kind}) | "
        f"torch {torch.__version__} | transformers {transformers.__version__}\n"
        f"cpus: {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}) | torch threads: {torch.get_num_threads()} "
        f"(torch default, unchanged; XLA uses its own CPU thread pool)"
    )
    load = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load:.2f}" + ("  <- other processes are busy; timings will be noisy"
                                                         if load > 0.5 else ""))
    return load


def environment(load: float) -> dict[str, object]:
    """The environment as a JSON-able dict, for `--json` outputs."""
    return {
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_1min_start": load,
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"
