"""Optimiser: AdamW with linear warmup + cosine decay and global-norm clipping, on float32 master weights, with
optional freezing of parameter groups for fine-tuning.

Groups are found from what each `Csm` method reads, not from parameter names (which may change):
`embeddings` = what `Csm.embed` reads (text and audio tables); `backbone` = the rest of what `backbone_forward`
reads (transformer stack, codebook-0 head); `depth` = the rest of what `depth_forward` reads (projection, depth
transformer, audio heads). Frozen parameters get no optimizer state (optax.multi_transform: their Adam moments are
`MaskedNode`s) and are never written by the train step.
Gradient accumulation (`grad_accum`) is done inside the train step (csm_jax.training.step), one update per batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from csm_jax.csm.config import CsmConfig
from csm_jax.csm.model import Csm

GROUPS = ("embeddings", "backbone", "depth")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """learning_rate: peak; warmup_steps linear from 0; cosine decay to end_lr_ratio * peak at decay_steps
    (None: the trainer's max_steps); weight decay on matrices only; clip_norm: global-norm clip of the trainable
    gradients (None: off); grad_accum: micro-batches per step; freeze: groups from GROUPS; freeze_regex: also
    freeze parameters whose path (`jax.tree_util.keystr`) matches."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    freeze: tuple[str, ...] = ()
    freeze_regex: str | None = None

    def __post_init__(self) -> None:
        bad = set(self.freeze) - set(GROUPS)
        if bad:
            raise ValueError(f"unknown parameter groups {sorted(bad)}; known: {GROUPS}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def lr_schedule(cfg: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
    """step (0-based count of updates done) -> learning rate of the next update: a linear warmup whose first
    update gets learning_rate / warmup_steps and the `warmup_steps`-th the full `learning_rate`, then cosine decay
    to `end_lr_ratio * learning_rate` by update `decay_steps`."""
    decay = cfg.decay_steps or total_steps
    if decay is None:
        raise ValueError("set OptimConfig.decay_steps or pass total_steps")
    decay = max(decay, cfg.warmup_steps + 1)
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.end_lr_ratio)
    base = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, decay,
                                              end_value=cfg.learning_rate * cfg.end_lr_ratio)
    return lambda step: base(step + 1)


def _reads(fn: Any, params: Any) -> list[bool]:
    """Which leaves of `params` the traced `fn(params)` reads (top-level jaxpr inputs that feed an equation)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    jaxpr = jax.make_jaxpr(lambda xs: fn(jax.tree_util.tree_unflatten(treedef, xs)))(abstract).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return [id(v) in used for v in jaxpr.invars]


def param_groups(model_cfg: CsmConfig, params: Any) -> dict[str, Any]:
    """group name -> bool tree over `params` (unboxed arrays or ShapeDtypeStructs) marking its members."""
    model, k = Csm(model_cfg), model_cfg.num_codebooks
    tokens, mask = jnp.zeros((1, 2, k + 1), jnp.int32), jnp.ones((1, 2, k + 1), bool)
    hidden, codes = jnp.zeros((1, model_cfg.backbone.hidden_size), jnp.float32), jnp.zeros((1, k), jnp.int32)

    def apply(method: Any, *args: Any) -> Any:
        return lambda p: model.apply({"params": p}, *args, method=method)

    emb = _reads(apply(Csm.embed, tokens, mask), params)
    bb = _reads(apply(Csm.backbone_forward, tokens, mask), params)
    dd = _reads(apply(Csm.depth_forward, hidden, codes), params)
    treedef = jax.tree_util.tree_structure(params)
    groups = {"embeddings": emb, "backbone": [b and not e for b, e in zip(bb, emb)],
              "depth": [d and not e for d, e in zip(dd, emb)]}
    return {name: jax.tree_util.tree_unflatten(treedef, flags) for name, flags in groups.items()}


def trainable_mask(model_cfg: CsmConfig, params: Any, cfg: OptimConfig) -> Any:
    """bool tree over `params`: True where the parameter is trained."""
    frozen = jax.tree.map(lambda _: False, params)
    if cfg.freeze:
        groups = param_groups(model_cfg, params)
        for name in cfg.freeze:
            frozen = jax.tree.map(lambda f, g: f or g, frozen, groups[name])
    if cfg.freeze_regex:
        pattern = re.compile(cfg.freeze_regex)
        frozen = jax.tree_util.tree_map_with_path(
            lambda path, f: f or bool(pattern.search(jax.tree_util.keystr(path))), frozen)
    return jax.tree.map(lambda f: not f, frozen)


def make_optimizer(cfg: OptimConfig, trainable: Any, params: Any, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """The optax transformation over the full parameter tree; `trainable` (bool tree) selects what is updated.
    `params` (arrays or ShapeDtypeStructs) gives the weight-decay mask (ndim >= 2)."""
    decay_mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)
    inner = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    inner.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": optax.chain(*inner), "frozen": optax.set_to_zero()}, labels)
