"""The XLA flags of the test processes, in one place: virtual CPU devices where a test needs a mesh, none (the
host's one device, as users run) for the servers, training runs and benchmarks the tests start."""

from __future__ import annotations

import os


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` virtual CPU devices (1: the host's one device)."""
    return f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """os.environ for a process a test starts (server, training run, benchmark): `devices` CPU devices and `extra`
    variables."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), **extra}
