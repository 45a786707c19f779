"""Llama-style transformer stack used for both CSM's backbone and its depth decoder.

Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `mlp`); `csm_jax.sharding` maps them to mesh
axes. Projection kernels are stored as torch Linear weights [out, in] (what checkpoints hold; faster to stream on
CPU for one-token steps, see `linear`), in the compute dtype or as int8 with per-output-channel scales
(`kernel_scale`, see `csm_jax.csm.quantize`). q/k projections use the rotate-half RoPE layout (transformers);
original checkpoints are permuted on load. Backend-dependent forms (e.g. small-row products) follow
`csm_jax.backend.current()`.
An optional static KV cache (slot = absolute position) serves prefill and one-step decoding with the same code.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax import backend
from csm_jax.csm.config import LlamaConfig
from csm_jax.kernels import int8_gemv
from csm_jax.rope import apply_rope, inv_frequencies

Cache = dict[str, jax.Array]
_NEG = -1e30


def linear(x: jax.Array, kernel: jax.Array, decode: bool = False, scale: jax.Array | None = None,
           out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [..., in] times a torch-layout kernel [*out, in] -> [..., *out] in `out_dtype` (default x's dtype),
    accumulated in float32 at least. The kernel is used in x's dtype: stored in it (no-op), cast from float32, or
    int8 with `scale` [*out] (per output channel: x @ (q * s).T == (x @ q.T) * s, the scale applied to the
    float32 accumulator).
    `decode`: a generation step, whose few rows may take the multiply-reduce form or, with an int8 kernel and
    float32 x, the native kernel (`csm_jax.kernels.int8_gemv`) when the backend policy says so
    (`csm_jax.backend`); otherwise (training, full forward passes) always a dot, so results do not depend on how
    many rows a batch has."""
    lead, n_in, out = x.shape[:-1], x.shape[-1], kernel.shape[:-1]
    rows = math.prod(lead)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x2 = x.reshape(rows, n_in)
    kernel = kernel.reshape(-1, n_in)  # 2-D [out, in]: XLA:CPU is 2-3x slower on [*out, in]
    policy = backend.current()
    if decode and scale is not None and policy.int8_kernel == "native" and rows <= int8_gemv.MAX_ROWS \
            and x.dtype == jnp.float32 and kernel.dtype == jnp.int8 and int8_gemv.available():
        y = int8_gemv.int8_matmul(x2, kernel, scale.reshape(-1))  # the native kernel (`csm_jax.backend`)
        return y.astype(x.dtype if out_dtype is None else out_dtype).reshape(*lead, *out)
    kernel = kernel.astype(x.dtype)
    if decode and policy.small_row_products and 1 < rows <= policy.small_rows:
        y = jnp.sum(kernel.astype(acc)[None] * x2.astype(acc)[:, None, :], axis=-1)
    elif decode and policy.small_row_products and rows == 1 and scale is not None:
        # one row of an int8 kernel: as a dot, XLA:CPU writes out the whole dequantised kernel first (15x slower);
        # this reduce streams the int8 weights once (written without a row axis, which XLA would turn into a dot)
        y = jnp.sum(kernel.astype(acc) * x2.astype(acc), axis=-1)[None]
    else:
        y = jax.lax.dot_general(x2, kernel, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    if scale is not None:
        y = y * scale.reshape(-1).astype(acc)
    return y.astype(x.dtype if out_dtype is None else out_dtype).reshape(*lead, *out)


def optional_param(module: nn.Module, name: str) -> jax.Array | None:
    """A parameter present only in some parameter trees (the per-channel scales of int8 kernels,
    `csm_jax.csm.quantize`), or None."""
    return module.get_variable("params", name) if module.has_variable("params", name) else None


def kernel_init(base: nn.initializers.Initializer = nn.initializers.lecun_normal()) -> nn.initializers.Initializer:
    """Initializer of [..., out, in] kernels: `base`'s [..., in, out] draw, transposed (seeded models keep their
    values)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.swapaxes(base(key, (*shape[:-2], shape[-1], shape[-2]), dtype), -1, -2)

    return init


class Linear(nn.Module):
    """Bias-free projection with a torch-layout kernel [*features, in]; `axes` are its logical names (features
    then in). Several features dimensions make one fused projection (e.g. q/k/v): one larger product, and
    [out..., in] stays shardable along its leading (head) dimension. The input is cast to `dtype`; the output is
    in `out_dtype` (default `dtype`): float32 hands on the float32 accumulator unrounded."""

    features: int | tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype
    decode: bool = False  # see `linear`
    init: nn.initializers.Initializer | None = None  # default: `kernel_init()` (one features dimension)
    out_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        init = self.init or kernel_init()
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), (*features, x.shape[-1]))
        return linear(x.astype(self.dtype), kernel, self.decode, optional_param(self, "kernel_scale"), self.out_dtype)


def qkv_kernel_init() -> nn.initializers.Initializer:
    """The fused [Hkv, R + 2, hd, D] q/k/v kernel as three separately initialised projections (q, k, v)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        hkv, r2, hd, d = shape
        kq, kk, kv = jax.random.split(key, 3)
        q = kernel_init()(kq, (hkv * (r2 - 2) * hd, d), dtype).reshape(hkv, r2 - 2, hd, d)
        k, v = (kernel_init()(rng, (hkv * hd, d), dtype).reshape(hkv, 1, hd, d) for rng in (kk, kv))
        return jnp.concatenate([q, k, v], axis=1)

    return init


class RMSNorm(nn.Module):
    """x [..., D] normalised and scaled in float32, rounded once to `dtype`."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * xf).astype(self.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D], positions int32 [B, T]; cache k/v [B', Hkv, hd, S] (B' >= B: rows past B are left as
        they are) indexed by position.

        Keys and values are attended as [B * Hkv, hd, S]: both products then read the cache as XLA:CPU's dot
        wants it and the cache is updated in place (a [B, Hkv, ...] view copies the cache when B == 1)."""
        cfg, dt = self.cfg, self.dtype
        b, t, _ = x.shape
        h, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        r = h // hkv
        # q, k and v in one product, grouped by KV head: kernel [Hkv, R + 2, hd, D] holds, for KV head g, the
        # query heads g * R .. g * R + R - 1 (transformers' GQA order), then g's key, then g's value
        dec = cache is not None
        # float32 out of the product, rotated in float32, rounded to the compute dtype once
        qkv = Linear((hkv, r + 2, hd), ("kv_heads", "qkv", "head_dim", "embed"), dt, dec, qkv_kernel_init(),
                     name="qkv_proj", out_dtype=jnp.float32)(x)
        q = qkv[:, :, :, :r].reshape(b, t, h, hd)
        k, v = qkv[:, :, :, r], qkv[:, :, :, r + 1]  # [B, T, Hkv, hd]
        inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q, k = (apply_rope(a, positions, inv_freq).astype(dt) for a in (q, k))
        v = v.astype(dt)
        if cache is None:
            keys, values = (a.transpose(0, 2, 3, 1).reshape(b * hkv, hd, t) for a in (k, v))
            k_pos = positions
        else:
            # the cache may hold more rows than x (a serving row bucket uses its first B rows, in place)
            rows, s = cache["k"].shape[0], cache["k"].shape[-1]
            # row b, head g of k/v at position p -> cache[b * Hkv + g, :, p]: index arrays [B, T, Hkv]
            bg = jnp.arange(b * hkv).reshape(b, 1, hkv)
            pos = jnp.broadcast_to(positions[:, :, None], (b, t, hkv))
            keys, values = (cache[n].reshape(rows * hkv, hd, s).at[bg, :, pos].set(a.astype(cache[n].dtype))
                            for n, a in (("k", k), ("v", v)))
            cache = {"k": keys.reshape(rows, hkv, hd, s), "v": values.reshape(rows, hkv, hd, s)}
            keys, values = keys[: b * hkv], values[: b * hkv]
            k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
        qg = q.reshape(b, t, hkv, r, hd).transpose(0, 2, 3, 1, 4).reshape(b * hkv, r, t, hd)
        policy = backend.current()
        block = policy.attention_block
        if cache is not None and t == 1 and policy.decode_attention == "filled" and keys.shape[-1] > block \
                and keys.shape[-1] % block == 0:
            out = filled_attention(qg, keys, values, jnp.repeat(positions[:, 0], hkv), block, dt)
        else:
            allowed = jnp.repeat(k_pos[:, None, :] <= positions[:, :, None], hkv, axis=0)  # [B*Hkv, T, S]
            scores = jnp.einsum("xrtd,xds->xrts", qg, keys.astype(dt), preferred_element_type=jnp.float32)
            scores = jnp.where(allowed[:, None], scores * hd**-0.5, _NEG)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            if cache is None:  # training: the alignment loss reads these (a no-op unless "intermediates" is mutable)
                self.sow("intermediates", "probs", probs)
            out = jnp.einsum("xrts,xds->xtrd", probs, values.astype(dt), preferred_element_type=jnp.float32)
        out = out.astype(dt).reshape(b, hkv, t, r, hd)
        out = out.transpose(0, 2, 1, 3, 4).reshape(b, t, h * hd)
        return Linear(cfg.hidden_size, ("embed", "heads"), dt, dec, name="o_proj", out_dtype=jnp.float32)(out), cache


def filled_attention(qg: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array, block: int,
                     dt: jnp.dtype) -> jax.Array:
    """One-step attention over the filled blocks of a static cache: qg [X, R, 1, hd] (X = B * Hkv), keys/values
    [X, hd, S], positions int32 [X] (the query's slot; slots <= it are attended) -> float32 [X, 1, R, hd].
    Visits blocks of `block` slots up to the block of the largest position (a data-dependent trip count) with an
    online softmax, so the unfilled rest of the cache is never read."""
    x, r, _, hd = qg.shape
    q = qg[:, :, 0]
    slots = jnp.arange(block)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, denom, acc = carry
        kb, vb = (jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=2).astype(dt) for a in (keys, values))
        sc = jnp.einsum("xrd,xds->xrs", q, kb, preferred_element_type=jnp.float32) * hd**-0.5
        sc = jnp.where((i * block + slots[None, :] <= positions[:, None])[:, None], sc, _NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.exp(sc - m_new[..., None])
        fix = jnp.exp(m - m_new)
        acc = acc * fix[..., None] + jnp.einsum("xrs,xds->xrd", p.astype(dt), vb, preferred_element_type=jnp.float32)
        return m_new, denom * fix + jnp.sum(p, axis=-1), acc

    init = (jnp.full((x, r), _NEG, jnp.float32), jnp.zeros((x, r), jnp.float32), jnp.zeros((x, r, hd), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, jnp.max(positions) // block + 1, body, init)
    return (acc / denom[..., None])[:, None]


class MLP(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype
    decode: bool = False  # see `linear`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, dec, f32 = self.cfg, self.dtype, self.decode, jnp.float32
        # (gate and up stay apart: for 2-8 rows XLA already fuses both products and down_proj into one)
        # silu(gate) * up from the float32 accumulators, rounded to the compute dtype once (by down_proj)
        gate = Linear(cfg.intermediate_size, ("mlp", "embed"), dt, dec, name="gate_proj", out_dtype=f32)(x)
        up = Linear(cfg.intermediate_size, ("mlp", "embed"), dt, dec, name="up_proj", out_dtype=f32)(x)
        return Linear(cfg.hidden_size, ("embed", "mlp"), dt, dec, name="down_proj", out_dtype=f32)(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache | None]:
        cfg, dt = self.cfg, self.dtype
        a, cache = Attention(cfg, dt, name="self_attn")(RMSNorm(cfg.norm_eps, dt, name="input_layernorm")(x),
                                                         positions, cache)
        x = x + a
        mlp = MLP(cfg, dt, cache is not None, name="mlp")
        return x + mlp(RMSNorm(cfg.norm_eps, dt, name="post_attention_layernorm")(x)), cache


class Transformer(nn.Module):
    """[B, T, D] inputs (embeddings) at `positions` -> final-normed hidden [B, T, D] in `dtype`. Layers run as a
    Python loop (faster than scan for one-token steps on CPU). The residual stream is float32: in bfloat16 its sums
    would round at every layer. The products' inputs, the attention probabilities and the KV cache take the compute
    dtype; everything between a product's float32 accumulator and the next product's input (RoPE, silu * up, the
    residual add, RMSNorm) stays float32 and is rounded once."""

    cfg: LlamaConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, caches: list[Cache] | None = None
    ) -> tuple[jax.Array, list[Cache] | None]:
        x = x.astype(jnp.float32)  # the residual stream stays float32 whatever the compute dtype
        new_caches = []
        for i in range(self.cfg.num_layers):
            x, c = Block(self.cfg, self.dtype, name=f"layers_{i}")(x, positions, None if caches is None else caches[i])
            new_caches.append(c)
        x = RMSNorm(self.cfg.norm_eps, self.dtype, name="norm")(x)
        return x, (new_caches if caches is not None else None)


def init_cache(cfg: LlamaConfig, batch_size: int, length: int, dtype: jnp.dtype = jnp.float32) -> list[Cache]:
    """Zeroed static KV caches, one per layer: k/v [B, Hkv, head_dim, length]."""
    shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, length)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
