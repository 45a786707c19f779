"""Jitted, sharded train and eval steps.

`TrainProgram` ties a model config, loss and optimiser settings and a mesh together: it places the TrainState by the
logical-axis rules, shards each batch over the `batch` rule's mesh axes (data x fsdp by default; with several
processes every process passes the same global batch and places its own rows), and compiles
`train_step(state, batch) -> (state, metrics)` (state donated) and `eval_stats(params, batch) -> LossStats`.

Gradient accumulation: a batch of B rows is split into `grad_accum` micro-batches of strided rows
(i, i + A, i + 2A, ...: each stays spread over the batch shards); their gradients are summed with every loss term
normalised by the totals of the whole batch, so one step on A micro-batches equals one step on the whole batch.
Only trainable leaves are differentiated and accumulated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax.csm.config import CsmConfig
from csm_jax.sharding import Rules
from csm_jax.training.loss import LossConfig, LossStats, eligible_frames, finalize, loss_stats, select_depth_frames
from csm_jax.training.loss import weighted_loss
from csm_jax.training.mesh import TRAIN_RULES
from csm_jax.training.optim import OptimConfig, lr_schedule, make_optimizer, trainable_mask
from csm_jax.training.state import TrainState, abstract_state, boxed_abstract_params, make_init_fn

BATCH_KEYS = ("tokens", "mask", "targets")


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def make_train_fn(
    model_cfg: CsmConfig,
    loss_cfg: LossConfig,
    tx: optax.GradientTransformation,
    trainable: Any,
    schedule: optax.Schedule,
    grad_accum: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) train step: loss, gradients of the trainable leaves (accumulated over `grad_accum`
    micro-batches), one optimizer update. Metrics: `finalize`'s plus grad_norm (trainable, before clipping) and
    lr (of this update)."""
    mask_leaves, treedef = jax.tree.flatten(trainable)
    train_idx = [i for i, t in enumerate(mask_leaves) if t]

    def merge(all_leaves: list[Any], train_leaves: list[Any]) -> Any:
        leaves = list(all_leaves)
        for i, x in zip(train_idx, train_leaves):
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        a = grad_accum
        b = batch["tokens"].shape[0]
        if b % a:
            raise ValueError(f"batch size {b} is not a multiple of grad_accum={a}")
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        batch = {name: batch[name] for name in BATCH_KEYS}
        micro = jax.tree.map(lambda x: x.reshape(b // a, a, *x.shape[1:]).swapaxes(0, 1), batch)  # [A, B/A, ...]
        k = model_cfg.num_codebooks

        def select(key: jax.Array, mb: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
            return select_depth_frames(key, eligible_frames(mb), loss_cfg)

        selections = jax.vmap(select)(jax.random.split(key, a), micro)
        c0_total = jnp.sum(eligible_frames(batch)[:, 1:]).astype(jnp.float32)

        def depth_tokens(mb: dict[str, jax.Array], sel: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            bi, ti, valid = sel
            return jnp.sum(valid[:, None] & mb["mask"][bi, ti, 1:k]).astype(jnp.float32)

        depth_total = jnp.sum(jax.vmap(depth_tokens)(micro, selections))

        all_leaves = jax.tree.leaves(state.params)
        train_leaves = [all_leaves[i] for i in train_idx]

        def micro_loss(train_leaves: list[jax.Array], mb: dict[str, jax.Array],
                       sel: tuple[jax.Array, ...]) -> tuple[jax.Array, LossStats]:
            stats = loss_stats(merge(all_leaves, train_leaves), mb, sel, model_cfg, loss_cfg)
            return weighted_loss(stats, loss_cfg, c0_total, depth_total), stats

        grad_fn = jax.grad(micro_loss, has_aux=True)
        first = jax.tree.map(lambda x: x[0], (micro, selections))
        grads, stats = grad_fn(train_leaves, *first)
        if a > 1:
            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                g, s = grad_fn(train_leaves, *xs)
                return _add(carry, (g, s)), None

            rest = jax.tree.map(lambda x: x[1:], (micro, selections))
            (grads, stats), _ = jax.lax.scan(body, (grads, stats), rest)

        grad_norm = optax.tree.norm(grads)
        zeros = [jnp.zeros_like(x) for x in all_leaves]
        full_grads = merge(zeros, grads)
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u, t: (p + u).astype(p.dtype) if t else p, state.params, updates, trainable)
        metrics = finalize(stats, loss_cfg) | {"grad_norm": grad_norm,
                                               "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    return step


def make_eval_fn(model_cfg: CsmConfig, loss_cfg: LossConfig, key: jax.Array
                 ) -> Callable[[Any, dict[str, jax.Array]], LossStats]:
    """Loss statistics of one batch with a fixed depth-frame draw (`key`): deterministic, summable over batches."""

    def evaluate(params: Any, batch: dict[str, jax.Array]) -> LossStats:
        selection = select_depth_frames(key, eligible_frames(batch), loss_cfg)
        return loss_stats(params, batch, selection, model_cfg, loss_cfg)

    return evaluate


@dataclasses.dataclass(frozen=True)
class _Compiled:
    tx: optax.GradientTransformation
    trainable: Any
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    batch_divisor: int
    init: Callable[[jax.Array, Any], TrainState]
    train: Callable[..., Any]
    eval: Callable[..., Any]


@functools.lru_cache(maxsize=8)
def _compile(model_cfg: CsmConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig, mesh: Mesh, rules: Rules,
             total_steps: int | None, eval_loss_cfg: LossConfig, eval_seed: int) -> _Compiled:
    """The jitted functions of one setting; cached, so that programs built again with equal settings (a resumed
    trainer in the same process, tests) reuse the compiled executables."""
    abstract_params = nn.meta.unbox(boxed_abstract_params(model_cfg))
    trainable = trainable_mask(model_cfg, abstract_params, optim_cfg)
    schedule = lr_schedule(optim_cfg, total_steps)
    tx = make_optimizer(optim_cfg, trainable, abstract_params, total_steps)
    abstract, state_shardings = abstract_state(model_cfg, tx, mesh, rules)
    batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    replicated = NamedSharding(mesh, PartitionSpec())
    train_fn = make_train_fn(model_cfg, loss_cfg, tx, trainable, schedule, optim_cfg.grad_accum)
    eval_fn = make_eval_fn(model_cfg, eval_loss_cfg, jax.random.key(eval_seed))
    return _Compiled(
        tx=tx, trainable=trainable, schedule=schedule, abstract_state=abstract, state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        batch_divisor=int(np.prod([mesh.shape[n] for n in names])) if names else 1,
        init=make_init_fn(model_cfg, tx, state_shardings),
        train=jax.jit(train_fn, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
        eval=jax.jit(eval_fn, in_shardings=(state_shardings.params, batch_sharding), out_shardings=replicated),
    )


def single_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


class TrainProgram:
    """Compiled train/eval steps on a mesh (default: one device). `total_steps` sets the LR decay length when
    `optim_cfg.decay_steps` is None. `eval_loss_cfg` (default: `loss_cfg`) and `eval_seed` fix the eval draw.
    Attributes: tx, trainable (bool tree), schedule, abstract_state (ShapeDtypeStructs with shardings, for
    restoring), state_shardings, batch_sharding."""

    def __init__(
        self,
        model_cfg: CsmConfig,
        loss_cfg: LossConfig = LossConfig(),
        optim_cfg: OptimConfig = OptimConfig(),
        mesh: Mesh | None = None,
        rules: Rules = TRAIN_RULES,
        total_steps: int | None = None,
        eval_loss_cfg: LossConfig | None = None,
        eval_seed: int = 0,
    ) -> None:
        self.model_cfg, self.loss_cfg, self.optim_cfg = model_cfg, loss_cfg, optim_cfg
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = tuple(rules)
        c = _compile(model_cfg, loss_cfg, optim_cfg, self.mesh, self.rules, total_steps, eval_loss_cfg or loss_cfg,
                     eval_seed)
        self._c = c
        self.tx, self.trainable, self.schedule = c.tx, c.trainable, c.schedule
        self.abstract_state, self.state_shardings, self.batch_sharding = (c.abstract_state, c.state_shardings,
                                                                           c.batch_sharding)

    def init_state(self, key: jax.Array, params: Any | None = None) -> TrainState:
        """A fresh state on the mesh (new parameters from `key`, or the given float32 `params`)."""
        return self._c.init(key, params)

    def shard_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """The global batch (numpy, the same on every process) -> global arrays sharded over the batch axes; each
        process copies only the rows of its own devices."""
        out = {}
        for name in BATCH_KEYS:
            x = batch[name]
            if isinstance(x, jax.Array) and x.sharding == self.batch_sharding:
                out[name] = x
                continue
            x = np.asarray(x)
            if x.shape[0] % self._c.batch_divisor:
                raise ValueError(f"batch of {x.shape[0]} rows does not split over {self._c.batch_divisor} "
                                 "batch shards")
            out[name] = jax.make_array_from_callback(x.shape, self.batch_sharding, lambda index, x=x: x[index])
        return out

    def train_step(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update; `state` is donated (do not use it afterwards)."""
        return self._c.train(state, self.shard_batch(batch))

    def eval_stats(self, params: Any, batch: dict[str, Any]) -> LossStats:
        """Summed loss statistics of one batch (add them over batches, then `loss.finalize`)."""
        return self._c.eval(params, self.shard_batch(batch))
