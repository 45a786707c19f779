"""The XLA flags of every test process, in one place: XLA:CPU's fast-compile preset (the suite compiles hundreds of
distinct small programs and runs most of them a few times; on 2 cores the preset takes about a quarter off their
compile time and nothing measurable off their speed), plus virtual CPU devices where a test needs a mesh."""

from __future__ import annotations

import os

FAST_COMPILE = "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` virtual CPU devices (1: the host's one device, as users run)."""
    return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """os.environ for a process a test starts (server, training run, benchmark): `devices` CPU devices, the
    fast-compile preset, and `extra` variables."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), **extra}
