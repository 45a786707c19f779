"""Top-k + temperature sampling with per-row parameters and explicit PRNG keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The k-th largest logit comes from `lax.top_k` of this many values when every row's top_k fits (a full sort of
# the 2051-entry vocab costs ~40x more on CPU); larger top_k falls back to the sort. Both give the same value.
FAST_TOP_K = 64


def kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
    """x float [B, V], k int32 [B] -> [B, 1]: each row's k-th largest value, duplicates counted (k clipped to
    1..V)."""
    v = x.shape[-1]
    idx = jnp.clip(k - 1, 0, v - 1)[:, None]
    fast = min(FAST_TOP_K, v)

    def by_top_k(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(jax.lax.top_k(x, fast)[0], jnp.minimum(idx, fast - 1), axis=-1)

    def by_sort(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(jnp.sort(x, axis=-1)[:, ::-1], idx, axis=-1)

    if fast == v:
        return by_top_k(x)
    return jax.lax.cond(jnp.all(idx < fast), by_top_k, by_sort, x)


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
