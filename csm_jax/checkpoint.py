"""Converted checkpoints: an orbax-saved parameter tree plus a JSON description, in one directory.

Layout::

    <dir>/csm_jax.json    {"kind": "mimi" | ..., "format_version": 1, "config": {...}}
    <dir>/params/         orbax StandardCheckpointer tree (float32 numpy arrays)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "csm_jax.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, of the wrong kind, or does not fit the model."""


def is_converted(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def save(path: str | Path, params: Any, kind: str, config: dict[str, Any]) -> Path:
    """Write `params` (pytree of arrays) and `config` to directory `path` (must not exist or be empty)."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} exists and is not empty; refusing to overwrite")
    path.mkdir(parents=True, exist_ok=True)
    host = jax.tree_util.tree_map(lambda a: np.asarray(a), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", host)
        ckptr.wait_until_finished()
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": config}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def read_meta(path: str | Path, kind: str) -> dict[str, Any]:
    """The JSON description of a converted checkpoint of the given kind."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from e
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


def restore(path: str | Path, abstract_params: Any) -> Any:
    """Restore the parameter tree, checking it against `abstract_params` (pytree of ShapeDtypeStruct)."""
    path = Path(path).absolute()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / "params", abstract_params)
    except Exception as e:  # orbax raises many types for missing/corrupt/mismatched trees
        raise CheckpointError(f"cannot restore parameters from {path / 'params'}: {e}") from e
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    problems = [f"{k}: stored {list(got[k])}, expected {list(want[k])}" for k in want if k in got and got[k] != want[k]]
    problems += [f"{k}: missing" for k in want if k not in got] + [f"{k}: unexpected" for k in got if k not in want]
    if problems:
        raise CheckpointError(f"{path} does not fit the model config:\n  " + "\n  ".join(problems[:20]))
    return params
