"""Mimi's causal transformer: pre-LayerNorm, RoPE, layer scale, GELU MLP, 250-step sliding-window attention.

Offline, attention runs block-wise (block b attends to blocks b-1 and b), which is exact for the window and
linear in length. Streaming keeps a ring KV cache per layer holding post-RoPE keys and values with their
absolute positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax.codec.config import MimiConfig
from csm_jax.codec.layers import State
from csm_jax.rope import apply_rope, inv_frequencies

_NEG = -1e30


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """q [..., Tq, H, D], k/v [..., Tk, Hkv, D], allowed bool [..., Tq, Tk] -> [..., Tq, H, D]."""
    h, hkv = q.shape[-2], k.shape[-2]
    q = q.reshape(*q.shape[:-2], hkv, h // hkv, q.shape[-1])
    scores = jnp.einsum("...qgrd,...kgd->...grqk", q.astype(dtype), k.astype(dtype)) * q.shape[-1] ** -0.5
    scores = jnp.where(allowed[..., None, None, :, :], scores.astype(jnp.float32), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("...grqk,...kgd->...qgrd", probs, v.astype(dtype))
    return out.reshape(*out.shape[:-3], h, out.shape[-1])


class Attention(nn.Module):
    cfg: MimiConfig

    def setup(self) -> None:
        cfg = self.cfg
        dense = lambda n: nn.Dense(n, use_bias=False, dtype=cfg.compute_dtype)  # noqa: E731
        self.q_proj = dense(cfg.num_heads * cfg.head_dim)
        self.k_proj = dense(cfg.num_kv_heads * cfg.head_dim)
        self.v_proj = dense(cfg.num_kv_heads * cfg.head_dim)
        self.o_proj = dense(cfg.hidden_size)

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] at positions 0..T-1 -> [B, T, D]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self._qkv(x, jnp.arange(t)[None])
        w = min(cfg.sliding_window, t)
        nb = -(-t // w)
        pad = ((0, 0), (0, nb * w - t), (0, 0), (0, 0))
        blocks = lambda a: jnp.pad(a, pad).reshape(b, nb, w, *a.shape[2:])  # noqa: E731
        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        shift = lambda a: jnp.pad(a, ((0, 0), (1, 0)) + ((0, 0),) * (a.ndim - 2))[:, :-1]  # noqa: E731
        keys = jnp.concatenate([shift(kb), kb], axis=2)  # [B, nb, 2w, Hkv, D]
        values = jnp.concatenate([shift(vb), vb], axis=2)
        qpos = jnp.arange(nb * w).reshape(nb, w)
        kpos = jnp.concatenate([qpos - w, qpos], axis=1)
        delta = qpos[:, :, None] - kpos[:, None, :]
        allowed = (kpos[:, None, :] >= 0) & (delta >= 0) & (delta < cfg.sliding_window)
        out = _attend(qb, keys, values, allowed[None], cfg.compute_dtype)
        out = out.reshape(b, nb * w, cfg.num_heads * cfg.head_dim)[:, :t]
        return self.o_proj(out)

    def step(self, x: jax.Array, cache: State, offset: jax.Array) -> tuple[jax.Array, State]:
        """x [B, T, D] at positions offset[b] + t; cache k/v [B, S, Hkv, D], pos int32 [B, S] (-1 = empty)."""
        cfg = self.cfg
        b, t, _ = x.shape
        positions = offset[:, None] + jnp.arange(t)[None]
        q, k, v = self._qkv(x, positions)
        size = cache["pos"].shape[1]
        slots = positions % size
        rows = jnp.arange(b)[:, None]
        new_cache = {
            "k": cache["k"].at[rows, slots].set(k.astype(cache["k"].dtype)),
            "v": cache["v"].at[rows, slots].set(v.astype(cache["v"].dtype)),
            "pos": cache["pos"].at[rows, slots].set(positions),
        }
        delta = positions[:, :, None] - new_cache["pos"][:, None, :]
        allowed = (new_cache["pos"][:, None, :] >= 0) & (delta >= 0) & (delta < cfg.sliding_window)
        out = _attend(q, new_cache["k"], new_cache["v"], allowed, cfg.compute_dtype)
        return self.o_proj(out.reshape(b, t, -1)), new_cache


class LayerScale(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("scale", nn.initializers.constant(0.01), (self.dim,)).astype(x.dtype)


class TransformerLayer(nn.Module):
    cfg: MimiConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.input_layernorm = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32)
        self.post_attention_layernorm = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32)
        self.self_attn = Attention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.fc1 = nn.Dense(cfg.intermediate_size, use_bias=False, dtype=cfg.compute_dtype)
        self.fc2 = nn.Dense(cfg.hidden_size, use_bias=False, dtype=cfg.compute_dtype)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def _mlp(self, x: jax.Array) -> jax.Array:
        h = self.post_attention_layernorm(x).astype(self.cfg.compute_dtype)
        return x + self.mlp_layer_scale(self.fc2(nn.gelu(self.fc1(h), approximate=False))).astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.input_layernorm(x).astype(self.cfg.compute_dtype)
        x = x + self.self_attn_layer_scale(self.self_attn(h)).astype(x.dtype)
        return self._mlp(x)

    def step(self, x: jax.Array, cache: State, offset: jax.Array) -> tuple[jax.Array, State]:
        h = self.input_layernorm(x).astype(self.cfg.compute_dtype)
        a, cache = self.self_attn.step(h, cache, offset)
        x = x + self.self_attn_layer_scale(a).astype(x.dtype)
        return self._mlp(x), cache


class Transformer(nn.Module):
    """float [B, T, hidden_size] -> same shape. The residual stream is kept in float32."""

    cfg: MimiConfig

    def setup(self) -> None:
        self.layers = [TransformerLayer(self.cfg) for _ in range(self.cfg.num_layers)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for layer in self.layers:
            x = layer(x)
        return x

    def init_state(self, batch_size: int, steps_per_call: int) -> State:
        """Ring caches sized window + steps_per_call - 1, so a call never evicts a key its queries need."""
        cfg = self.cfg
        size = cfg.sliding_window + steps_per_call - 1
        kv = (batch_size, size, cfg.num_kv_heads, cfg.head_dim)
        layer_cache = lambda: {  # noqa: E731
            "k": jnp.zeros(kv, jnp.float32),
            "v": jnp.zeros(kv, jnp.float32),
            "pos": jnp.full((batch_size, size), -1, jnp.int32),
        }
        return {"offset": jnp.zeros((batch_size,), jnp.int32), "layers": [layer_cache() for _ in self.layers]}

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """x [B, T, D] continuing each stream at its own offset -> ([B, T, D], new state)."""
        x = x.astype(jnp.float32)
        caches = []
        for layer, cache in zip(self.layers, state["layers"]):
            x, cache = layer.step(x, cache, state["offset"])
            caches.append(cache)
        return x, {"offset": state["offset"] + x.shape[1], "layers": caches}
