"""The training mesh: axes ("data", "fsdp", "tensor") and logical-axis rules for it; multi-host start-up.

Default layout: the batch over data x fsdp; model widths (`embed`, `decoder_embed`) sharded over fsdp (ZeRO-3
style: parameters and optimizer state split, gathered per use); heads, KV heads, MLP and vocab over tensor.
`csm_jax.sharding.logical_sharding` leaves a dimension replicated when its axis does not divide it (e.g. the
2051-entry audio vocab over tensor = 2).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from csm_jax.sharding import Rules

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("codebooks", None),
    ("norm", None),
    ("head_dim", None),
    ("cache_seq", None),
    ("frame", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; data = -1 takes all devices left over by fsdp x tensor. `rules`: logical axis -> mesh axes
    (None: TRAIN_RULES)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] | None = None

    def resolved_rules(self) -> Rules:
        if self.rules is None:
            return TRAIN_RULES
        return tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in self.rules)


def make_train_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, across hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    inner = cfg.fsdp * cfg.tensor
    if cfg.fsdp < 1 or cfg.tensor < 1 or inner > len(devices):
        raise ValueError(f"mesh fsdp={cfg.fsdp} x tensor={cfg.tensor} does not fit {len(devices)} devices")
    data = len(devices) // inner if cfg.data == -1 else cfg.data
    if data < 1 or data * inner > len(devices):
        raise ValueError(f"mesh {data}x{cfg.fsdp}x{cfg.tensor} needs {data * inner} devices, have {len(devices)}")
    if data * inner < len(devices):
        log.warning("training mesh uses %d of %d devices", data * inner, len(devices))
    return Mesh(np.array(devices[: data * inner]).reshape(data, cfg.fsdp, cfg.tensor), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` arguments. enabled=False: single process. With enabled=True and no address,
    JAX auto-detects the cluster (SLURM, Open MPI, Cloud TPU, ...). coordinator_address: "host:port" of process 0;
    process_id in [0, num_processes); initialization_timeout: seconds to wait for all processes to join (None: JAX's
    default, 300; None keeps the saved configs of older checkpoints equal)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int | None = None

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(self.enabled, bool):
            raise ValueError(f"distributed.enabled must be true or false, got {self.enabled!r}")
        if self.coordinator_address is not None:
            host, _, port = str(self.coordinator_address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"distributed.coordinator_address must be HOST:PORT (port 1-65535), got "
                                 f"{self.coordinator_address!r}")
        if self.num_processes is not None and not (is_int(self.num_processes) and self.num_processes >= 1):
            raise ValueError(f"distributed.num_processes must be an int >= 1, got {self.num_processes!r}")
        if self.process_id is not None and not (is_int(self.process_id) and self.process_id >= 0):
            raise ValueError(f"distributed.process_id must be an int >= 0, got {self.process_id!r}")
        if self.process_id is not None and self.num_processes is not None and self.process_id >= self.num_processes:
            raise ValueError(f"distributed.process_id={self.process_id} is out of range for num_processes="
                             f"{self.num_processes} (ids are 0..{self.num_processes - 1})")
        if self.local_device_ids is not None and not all(is_int(i) and i >= 0 for i in self.local_device_ids):
            raise ValueError(f"distributed.local_device_ids must be ints >= 0, got {self.local_device_ids!r}")
        if self.initialization_timeout is not None and not (is_int(self.initialization_timeout)
                                                            and self.initialization_timeout >= 1):
            raise ValueError(f"distributed.initialization_timeout must be an int >= 1 (seconds), got "
                             f"{self.initialization_timeout!r}")


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Raise RuntimeError unless a TCP connection to `address` ("host:port") opens within `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"jax.distributed: coordinator {address} not reachable within {timeout_s:g} s "
                                   f"({e}); is process 0 running, and is the address process 0's host and a free "
                                   "port?") from e
            time.sleep(0.2)


def maybe_initialize_distributed(cfg: DistributedConfig | None) -> bool:
    """Join the multi-host job when configured (once per process, before any other JAX call); True if it is (now)
    initialised. A process other than 0 first checks that the coordinator accepts connections (RuntimeError after
    `initialization_timeout` s otherwise); when not all `num_processes` join in that time, JAX aborts the process
    (DEADLINE_EXCEEDED) after the INFO line naming the settings."""
    if cfg is None or not cfg.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    timeout = cfg.initialization_timeout if cfg.initialization_timeout is not None else 300
    if cfg.coordinator_address is not None and cfg.process_id not in (None, 0):
        _wait_for_coordinator(cfg.coordinator_address, timeout)
    log.info("jax.distributed: process %s of %s joining coordinator %s; waiting up to %d s for all processes (on "
             "DEADLINE_EXCEEDED check that every process has this coordinator_address and num_processes and its own "
             "process_id)", cfg.process_id, cfg.num_processes, cfg.coordinator_address, timeout)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids is not None else None,
        initialization_timeout=timeout,
    )
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
