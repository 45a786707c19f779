"""Logical axis names -> device mesh. Models name their axes (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
`batch`, ...); rules map each to a mesh axis or None (replicated), as MaxText's `logical_axis_rules` do.

Default serving layout: requests (`batch`) over `data`, attention heads and MLP over `tensor`.
"""

from __future__ import annotations

import numbers
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


def mesh_shape(data: int, tensor: int, num_devices: int) -> tuple[int, int]:
    """(data, tensor) with a -1 resolved to the devices the other axis leaves; raises ValueError, in one line,
    when the shape is malformed or does not fit `num_devices`."""
    for name, size in (("data", data), ("tensor", tensor)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size < 1 and size != -1):
            raise ValueError(f"mesh {name} must be a positive int or -1 (the rest of the devices), got {size!r}")
    data, tensor = int(data), int(tensor)
    if data == -1 and tensor == -1:
        raise ValueError("mesh: at most one of data and tensor may be -1")
    if -1 in (data, tensor):
        rest, other, size = ("data", "tensor", tensor) if data == -1 else ("tensor", "data", data)
        if num_devices % size:
            raise ValueError(f"mesh {rest}=-1 needs the device count ({num_devices}) to be a multiple of "
                             f"{other}={size}")
        data, tensor = (num_devices // size, size) if data == -1 else (size, num_devices // size)
    if data * tensor > num_devices:
        raise ValueError(f"mesh data={data} x tensor={tensor} needs {data * tensor} devices, have {num_devices}")
    return data, tensor


def make_mesh(data: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, tensor) mesh over the first data * tensor devices (Auto axis types); one of the two may be -1:
    every device the other leaves (their number must be a multiple of it)."""
    devices = list(devices if devices is not None else jax.devices())
    data, tensor = mesh_shape(data, tensor, len(devices))
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
