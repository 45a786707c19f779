"""Strict checkpoint conversion shared by all models: a list of `Entry`s says which file tensors make each
Flax parameter; `convert` checks every one (missing, unexpected, mis-shaped) before building anything."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.traverse_util
import numpy as np
from safetensors import SafetensorError, safe_open

from csm_jax.checkpoint import CheckpointError

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its "/"-joined Flax path, the file tensors (key, expected shape) it is made of, and how."""

    path: str
    sources: tuple[tuple[str, Shape], ...]
    combine: Callable[..., np.ndarray]


def transposed(path: str, key: str, shape: Shape) -> Entry:
    """torch Linear [out, in] (or any 2-D) -> [in, out]."""
    return Entry(path, ((key, shape[::-1]),), lambda w: w.T)


def same(path: str, key: str, shape: Shape) -> Entry:
    return Entry(path, ((key, shape),), lambda w: w)


def invert(entry: Entry, value: np.ndarray) -> dict[str, np.ndarray]:
    """Invert an entry whose `combine` only moves elements (transposes, reshapes, concatenations): the Flax value
    -> {file key: float32 tensor in the file's layout}. `combine` is run on element indices to find where each
    value came from; anything but a permutation of the sources' elements raises."""
    sizes = [math.prod(shape) for _, shape in entry.sources]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    index = np.asarray(entry.combine(*(np.arange(o, o + n).reshape(shape)
                                       for o, n, (_, shape) in zip(offsets, sizes, entry.sources))))
    if index.shape != value.shape or index.size != total or np.bincount(index.ravel(), minlength=total).max() != 1:
        raise AssertionError(f"the mapping {[k for k, _ in entry.sources]} -> {entry.path} is not a permutation")
    flat = np.empty(total, np.float32)
    flat[index.ravel()] = np.asarray(value, np.float32).ravel()
    return {key: flat[o:o + n].reshape(shape) for o, n, (key, shape) in zip(offsets, sizes, entry.sources)}


def rope_interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows [H*D, in] from interleaved RoPE pairs (moshi, torchtune) to rotate-half
    (transformers)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def read_safetensors(path: Path, prefix: str = "", exclude: str | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file whose key starts with `prefix` (stripped) and not with `exclude`."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                    if k.startswith(prefix) and not (exclude and k.startswith(exclude))}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def convert(
    tensors: Mapping[str, np.ndarray],
    entries: Iterable[Entry],
    source: str,
    what: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> dict[str, Any]:
    """File tensors -> nested float32 params. Raises CheckpointError listing every missing, unexpected or
    mis-shaped tensor (with both shapes); nothing partial is returned."""
    entries = list(entries)
    used = {key for e in entries for key, _ in e.sources}
    problems = []
    for e in entries:
        for key, want in e.sources:
            if key not in tensors:
                problems.append(f"missing tensor {key!r} (expected shape {list(want)})")
            elif tuple(tensors[key].shape) != tuple(want):
                problems.append(f"tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(want)}")
    unexpected = sorted(k for k in tensors if k not in used and not ignorable(k))
    problems += [f"unexpected tensor {k!r} with shape {list(tensors[k].shape)}" for k in unexpected]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit the {what}:\n  {shown}")
    flat = {}
    for e in entries:
        value = e.combine(*[np.asarray(tensors[key], dtype=np.float32) for key, _ in e.sources])
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{source}: non-finite values in {[k for k, _ in e.sources]}")
        flat[tuple(e.path.split("/"))] = np.ascontiguousarray(value, dtype=np.float32)
    return flax.traverse_util.unflatten_dict(flat)
