"""Top-k + temperature sampling with per-row parameters and explicit PRNG keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_top_k(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits float32 [B, V], key (one PRNG key), temperature float32 [B] (> 0), top_k int32 [B] (>= 1)
    -> int32 [B]. Keeps every logit >= the k-th largest (ties kept), then draws from softmax(logits / T).
    top_k == 1 is greedy (argmax)."""
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= kth, scaled, -jnp.inf)
    drawn = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(top_k == 1, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
