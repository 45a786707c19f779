"""Logical axis names -> device mesh. Models name their axes (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
`batch`, ...); rules map each to a mesh axis or None (replicated), as MaxText's `logical_axis_rules` do.

Default serving layout: requests (`batch`) over `data`, attention heads and MLP over `tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("qkv", None),  # fused q/k/v projection: which of a KV-head group's queries, its key or its value
    ("embed", None),
    ("decoder_embed", None),
    ("vocab", None),
    ("codebooks", None),
    ("norm", None),
    ("cache_seq", None),
    ("head_dim", None),
    ("frame", None),
)


def make_mesh(data: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor) mesh over the first data * tensor devices (Auto axis types)."""
    devices = list(devices if devices is not None else jax.devices())
    if data * tensor > len(devices):
        raise ValueError(f"mesh {data}x{tensor} needs {data * tensor} devices, have {len(devices)}")
    return Mesh(np.array(devices[: data * tensor]).reshape(data, tensor), ("data", "tensor"))


def _fit(mesh: Mesh, spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (e.g. 1 KV head over tensor=2 stays replicated)."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(axis if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_sharding(mesh: Mesh, rules: Rules, axes: tuple[str | None, ...], shape: Sequence[int]) -> NamedSharding:
    """NamedSharding for one array of `shape` whose dimensions carry logical names `axes`."""
    return NamedSharding(mesh, _fit(mesh, nn.logical_to_mesh_axes(axes, rules), shape))


def tree_shardings(mesh: Mesh, rules: Rules, boxed_abstract: Any) -> Any:
    """Shardings for a tree of `nn.Partitioned` boxes around ShapeDtypeStructs (`jax.eval_shape(model.init, ...)`),
    returned unboxed."""
    return jax.tree_util.tree_map(
        lambda box: logical_sharding(mesh, rules, box.names, box.value.shape),
        boxed_abstract,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
