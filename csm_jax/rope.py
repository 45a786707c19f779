"""Rotary position embeddings in the rotate-half layout (transformers'), shared by Mimi and CSM.

Checkpoints stored with interleaved pairs (moshi, torchtune) have their q/k rows permuted on load
(`csm_jax.weights.rope_interleaved_to_half`), so every model rotates the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float,
                    llama3_scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
    """float32 [head_dim / 2]. `llama3_scaling` = (factor, low_freq_factor, high_freq_factor, original_max_len)."""
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if llama3_scaling is None:
        return inv
    factor, low, high, old_len = llama3_scaling
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, H, D], positions int32 [B or 1, T] -> x rotated in float32, cast back to x.dtype."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)
