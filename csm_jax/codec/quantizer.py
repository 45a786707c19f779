"""Split residual vector quantizer: 1 semantic codebook + (num_quantizers - 1) acoustic codebooks.

Both halves project the same latent. Codebooks are stored as their effective centroids
(`embedding_sum / max(cluster_usage, 1e-5)` in the reference checkpoints).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax.codec.config import MimiConfig


class ResidualVQ(nn.Module):
    """codebooks: float32 [K, codebook_size, codebook_dim]; optional 1x1 in/out projections (Dense, no bias)."""

    cfg: MimiConfig
    num_codebooks: int

    def setup(self) -> None:
        cfg = self.cfg
        self.codebooks = self.param(
            "codebooks", nn.initializers.normal(1.0), (self.num_codebooks, cfg.codebook_size, cfg.codebook_dim)
        )
        self.project = cfg.codebook_dim != cfg.hidden_size
        if self.project:
            self.input_proj = nn.Dense(cfg.codebook_dim, use_bias=False)
            self.output_proj = nn.Dense(cfg.hidden_size, use_bias=False)

    def encode(self, x: jax.Array, n: int) -> jax.Array:
        """x float [B, T, hidden] -> int32 codes [B, T, n] (n <= num_codebooks), nearest centroid in fp32."""
        residual = (self.input_proj(x) if self.project else x).astype(jnp.float32)
        codebooks = self.codebooks[:n]
        norms = jnp.sum(codebooks**2, axis=-1)  # [n, bins]

        def one(res: jax.Array, cb: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            book, norm = cb
            dist = norm - 2.0 * jnp.einsum("btd,kd->btk", res, book, precision="highest")
            idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
            return res - book[idx], idx

        _, codes = jax.lax.scan(one, residual, (codebooks, norms))
        return jnp.moveaxis(codes, 0, -1)

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes int32 [B, T, n] -> float32 [B, T, hidden]: sum of centroids, projected back."""
        n = codes.shape[-1]
        summed = sum(self.codebooks[i][codes[..., i]] for i in range(n))
        return self.output_proj(summed) if self.project else summed


class SplitResidualVQ(nn.Module):
    cfg: MimiConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.semantic = ResidualVQ(cfg, cfg.num_semantic_quantizers)
        self.acoustic = ResidualVQ(cfg, cfg.num_quantizers - cfg.num_semantic_quantizers)

    def encode(self, x: jax.Array, num_codebooks: int) -> jax.Array:
        """x float [B, T, hidden] -> int32 [B, T, num_codebooks]."""
        n_sem = self.cfg.num_semantic_quantizers
        codes = self.semantic.encode(x, n_sem)
        if num_codebooks > n_sem:
            codes = jnp.concatenate([codes, self.acoustic.encode(x, num_codebooks - n_sem)], axis=-1)
        return codes

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes int32 [B, T, K] -> float32 [B, T, hidden]."""
        n_sem = self.cfg.num_semantic_quantizers
        out = self.semantic.decode(codes[..., :n_sem])
        if codes.shape[-1] > n_sem:
            out = out + self.acoustic.decode(codes[..., n_sem:])
        return out
