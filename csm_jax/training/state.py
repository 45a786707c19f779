"""Train state (step, float32 master parameters, optimizer state, PRNG key data) and its placement on a mesh.

Shardings come from the logical axis names the model gives its parameters (`nn.with_logical_partitioning`), so
parameters and the Adam moments that mirror them are placed alike; scalars (step, counts, key) are replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax import backend
from csm_jax.csm.config import CsmConfig
from csm_jax.csm.model import Csm
from csm_jax.sharding import Rules, logical_sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates done
    params: Any  # float32 master weights
    opt_state: Any
    rng: jax.Array  # uint32 key data (jax.random.key_data); the step's key is fold_in(rng, step)


def boxed_abstract_params(model_cfg: CsmConfig) -> Any:
    """The model's parameter tree as ShapeDtypeStructs in `nn.Partitioned` boxes (logical axis names)."""
    k = model_cfg.num_codebooks

    def init(key: jax.Array) -> Any:
        return Csm(model_cfg).init(key, jnp.zeros((1, 1, k + 1), jnp.int32), jnp.ones((1, 1, k + 1), bool))["params"]

    return jax.eval_shape(init, jax.random.key(0))


def init_params(model_cfg: CsmConfig, key: jax.Array) -> Any:
    """Fresh float32 parameters (unboxed)."""
    k = model_cfg.num_codebooks
    params = Csm(model_cfg).init(key, jnp.zeros((1, 1, k + 1), jnp.int32), jnp.ones((1, 1, k + 1), bool))["params"]
    return nn.meta.unbox(params)


def _shardings(mesh: Mesh, rules: Rules, boxed_tree: Any) -> Any:
    """Logical shardings for boxed leaves, replicated ones for the rest; returned unboxed."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x: Any) -> NamedSharding:
        if isinstance(x, nn.Partitioned):
            return logical_sharding(mesh, rules, x.names, x.value.shape)
        return replicated

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_state(model_cfg: CsmConfig, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                   rules: Rules | None = None) -> tuple[TrainState, TrainState | None]:
    """(TrainState of ShapeDtypeStructs, TrainState of NamedShardings or None without a mesh)."""
    boxed = boxed_abstract_params(model_cfg)
    boxed_opt = jax.eval_shape(tx.init, boxed)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed, opt_state=boxed_opt,
                             rng=key_data)
    shapes = nn.meta.unbox(boxed_state)
    if mesh is None:
        return shapes, None
    shardings = _shardings(mesh, rules, boxed_state)
    if jax.tree.structure(shardings) != jax.tree.structure(shapes):
        raise ValueError("train state shardings do not match the state structure")
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return shapes, shardings


def make_init_fn(model_cfg: CsmConfig, tx: optax.GradientTransformation, shardings: TrainState | None = None
                 ) -> Callable[[jax.Array, Any], TrainState]:
    """Jitted `(key, params | None) -> TrainState` (see `init_state`), created in place when `shardings` is given."""

    def make(key: jax.Array, params: Any) -> TrainState:
        init_key, rng_key = jax.random.split(key)
        if params is None:
            params = init_params(model_cfg, init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(rng_key))

    jitted = backend.jit_init(make) if shardings is None else backend.jit_init(make, out_shardings=shardings)
    expected = nn.meta.unbox(boxed_abstract_params(model_cfg))

    def init(key: jax.Array, params: Any | None = None) -> TrainState:
        if params is not None:
            got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
            want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(jnp.float32)), expected)
            if got != want:
                raise ValueError("params do not fit the model config (shapes/dtypes differ; params must be float32)")
            if shardings is not None:
                params = jax.device_put(params, shardings.params)
        return jitted(key, params)

    return init


def init_state(
    model_cfg: CsmConfig,
    tx: optax.GradientTransformation,
    key: jax.Array,
    params: Any | None = None,
    shardings: TrainState | None = None,
) -> TrainState:
    """A new TrainState: fresh parameters from `key` (or the given float32 `params`, e.g. from
    `csm_jax.csm.weights.load_csm_params`), optimizer state, step 0 and a PRNG key derived from `key`.
    With `shardings` (from `abstract_state`) everything is created in place on the mesh."""
    return make_init_fn(model_cfg, tx, shardings)(key, params)
