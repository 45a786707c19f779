"""Top-k + temperature sampling with per-row parameters and explicit PRNG keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 [..] -> uint32 keys with the same order (-0.0 and 0.0 equal; -inf lowest)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits & sign, ~bits, bits | sign)


def kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
    """x float [B, V], k int32 [B] -> [B, 1]: each row's k-th largest value, duplicates counted (k clipped to
    1..V). Exact, without a sort or a branch: the value's order key is built bit by bit from the top (32 count
    passes over the row, unrolled), the largest key t with at least k entries >= t. No data-dependent control
    flow, so one compiled serving frame holds no conditional and no host synchronisation."""
    keys = _order_keys(x)
    need = jnp.clip(k, 1, x.shape[-1])[:, None]
    t = jnp.zeros(need.shape, jnp.uint32)
    for bit in range(31, -1, -1):
        cand = t | jnp.uint32(1 << bit)
        t = jnp.where(jnp.sum(keys >= cand, axis=-1, keepdims=True) >= need, cand, t)
    # the entry whose key is t: the largest value whose key is <= t
    return jnp.max(jnp.where(keys <= t, x, -jnp.inf), axis=-1, keepdims=True).astype(x.dtype)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits float32 [B, V], keys (B PRNG keys, one per row), temperature float32 [B] (> 0), top_k int32 [B]
    (>= 1) -> int32 [B]. Keeps every logit >= the k-th largest (ties kept), then draws from softmax(logits / T).
    top_k == 1 is greedy (argmax). Row i draws as `sample_top_k(logits[i:i+1], keys[i], ...)` does."""
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    masked = jnp.where(scaled >= kth_largest(scaled, top_k), scaled, -jnp.inf)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, masked)
    return jnp.where(top_k == 1, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def sample_top_k(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits float32 [B, V], key (one PRNG key), temperature float32 [B] (> 0), top_k int32 [B] (>= 1)
    -> int32 [B]. Keeps every logit >= the k-th largest (ties kept), then draws from softmax(logits / T).
    top_k == 1 is greedy (argmax)."""
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    masked = jnp.where(scaled >= kth_largest(scaled, top_k), scaled, -jnp.inf)
    drawn = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(top_k == 1, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
