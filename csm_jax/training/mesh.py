"""The training mesh: axes ("data", "fsdp", "tensor") and logical-axis rules for it; multi-host start-up.

Default layout: the batch over data x fsdp; model widths (`embed`, `decoder_embed`) sharded over fsdp (ZeRO-3
style: parameters and optimizer state split, gathered per use); heads, KV heads, MLP and vocab over tensor.
`csm_jax.sharding.logical_sharding` leaves a dimension replicated when its axis does not divide it (e.g. the
2051-entry audio vocab over tensor = 2).
"""

from __future__ import annotations

import dataclasses
import logging
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
    JAX auto-detects the cluster (SLURM, Cloud TPU, ...)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def maybe_initialize_distributed(cfg: DistributedConfig | None) -> bool:
    """Join the multi-host job when configured (once per process); True if it is (now) initialised."""
    if cfg is None or not cfg.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids is not None else None,
    )
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
