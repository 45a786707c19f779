"""Sesame CSM as one Flax module: text + audio embeddings, the backbone (emits codebook 0, "semantic"), the
projection, and the depth decoder (emits codebooks 1..K-1, "acoustic").

A frame row has K + 1 columns: audio codes for codebooks 0..K-1 and a text token in column K; its input is the
masked sum of the K + 1 embeddings (audio codebook k, token t -> audio table row t + k * audio_vocab_size).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax.csm.config import CsmConfig
from csm_jax.csm.llama import Cache, Transformer, kernel_init, linear, optional_param

_EMBED_INIT = nn.initializers.normal(0.02)


def spoken_mask(mask: jax.Array, spoken: jax.Array, cfg: CsmConfig) -> jax.Array:
    """The mask the backbone reads: mask bool [..., S, K+1], spoken bool [..., S] (rows of the turn being spoken:
    training's target rows, the frames generation feeds back) -> mask with the audio columns from
    `cfg.backbone_codebooks` on cleared in spoken rows (context rows keep `cfg.embedded_codebooks`)."""
    column = jnp.arange(mask.shape[-1])
    narrow = (column >= cfg.backbone_codebooks) & (column < cfg.num_codebooks)
    return mask & ~(spoken[..., None] & narrow)


class Csm(nn.Module):
    cfg: CsmConfig

    def setup(self) -> None:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        bb, dd, v, k = cfg.backbone.hidden_size, cfg.decoder.hidden_size, cfg.audio_vocab_size, cfg.num_codebooks
        part = nn.with_logical_partitioning
        self.text_embeddings = self.param("text_embeddings", part(_EMBED_INIT, ("vocab", "embed")),
                                          (cfg.text_vocab_size, bb))
        self.audio_embeddings = self.param("audio_embeddings", part(_EMBED_INIT, ("vocab", "embed")), (k * v, bb))
        self.backbone = Transformer(cfg.backbone, dt)
        self.decoder = Transformer(cfg.decoder, dt)
        # projections are stored as torch Linear weights [out, in] (see llama.linear); int8 trees add
        # `<name>_scale` per output channel (csm_jax.csm.quantize)
        self.projection = self.param("projection", part(kernel_init(), ("decoder_embed", "embed")), (dd, bb))
        self.codebook0_head = self.param("codebook0_head", part(kernel_init(), ("vocab", "embed")), (v, bb))
        self.audio_head = self.param("audio_head", part(kernel_init(), ("codebooks", "vocab", "decoder_embed")),
                                     (k - 1, v, dd))

    # building blocks ------------------------------------------------------------------------------------
    def embed(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens int32 [B, S, K+1], mask bool [B, S, K+1] -> float [B, S, D_backbone] (masked embedding sum of the
        text column and the first `cfg.embedded_codebooks` audio columns; `spoken_mask` narrows spoken rows)."""
        cfg = self.cfg
        k, m_in = cfg.num_codebooks, cfg.embedded_codebooks
        tokens = jnp.where(mask, tokens, 0)  # masked columns may hold any filler; never index with it
        offsets = jnp.arange(m_in, dtype=jnp.int32) * cfg.audio_vocab_size
        audio = jnp.take(self.audio_embeddings, tokens[..., :m_in] + offsets, axis=0)  # [B, S, M, D]
        text = jnp.take(self.text_embeddings, tokens[..., k], axis=0)  # [B, S, D]
        m = mask.astype(jnp.float32)
        h = jnp.einsum("bskd,bsk->bsd", audio, m[..., :m_in]) + text * m[..., k, None]
        return h.astype(cfg.compute_dtype)

    def audio_embed(self, codes: jax.Array, codebook: jax.Array | int) -> jax.Array:
        """codes int32 [B] of `codebook` -> [B, D_backbone]."""
        return jnp.take(self.audio_embeddings, codes + codebook * self.cfg.audio_vocab_size, axis=0)

    def backbone_step(
        self, tokens: jax.Array, mask: jax.Array, positions: jax.Array, caches: list[Cache] | None
    ) -> tuple[jax.Array, jax.Array, list[Cache] | None]:
        """Rows at `positions` [B, S] -> (codebook-0 logits float32 [B, S, V], hidden [B, S, D_b], caches)."""
        h, caches = self.backbone(self.embed(tokens, mask), positions, caches)
        return self.c0_logits(h, caches is not None), h.astype(jnp.float32), caches

    def c0_logits(self, hidden: jax.Array, decode: bool = False) -> jax.Array:
        """hidden [..., D_b] -> float32 [..., V] (accumulated and returned in float32). `decode`: see
        `llama.linear`."""
        dt = self.cfg.compute_dtype
        return linear(hidden.astype(dt), self.codebook0_head, decode, optional_param(self, "codebook0_head_scale"),
                      out_dtype=jnp.float32)

    def decoder_step(
        self, inputs: jax.Array, positions: jax.Array, caches: list[Cache] | None
    ) -> tuple[jax.Array, list[Cache] | None]:
        """Depth-decoder inputs in backbone width [B, T, D_b] at positions [B, T] -> (hidden [B, T, D_d], caches)."""
        dt = self.cfg.compute_dtype
        projected = linear(inputs.astype(dt), self.projection, caches is not None,
                           optional_param(self, "projection_scale"))
        return self.decoder(projected, positions, caches)

    def audio_logits(self, hidden: jax.Array, codebook: jax.Array | int) -> jax.Array:
        """Depth-decoder hidden [B, D_d] -> float32 logits [B, V] for `codebook` (1..K-1); a generation step."""
        dt = self.cfg.compute_dtype
        head = jax.lax.dynamic_index_in_dim(self.audio_head, codebook - 1, keepdims=False)
        scale = optional_param(self, "audio_head_scale")
        if scale is not None:
            scale = jax.lax.dynamic_index_in_dim(scale, codebook - 1, keepdims=False)
        return linear(hidden.astype(dt), head, True, scale, out_dtype=jnp.float32)

    # full-sequence forms (training, parity) ----------------------------------------------------------------
    def backbone_forward(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B, S, K+1], mask bool [B, S, K+1] at positions 0..S-1 ->
        (codebook-0 logits float32 [B, S, V], final-normed hidden float32 [B, S, D_b])."""
        b, s = tokens.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        logits, hidden, _ = self.backbone_step(tokens, mask, positions, None)
        return logits, hidden

    def depth_forward(self, last_hidden: jax.Array, codes: jax.Array) -> jax.Array:
        """Teacher-forced depth decoder. last_hidden [B, D_b], codes int32 [B, K] ->
        float32 [B, K-1, V]; row i-1 holds the logits of codebook i given codes 0..i-1."""
        k = self.cfg.num_codebooks
        b = codes.shape[0]
        embeds = jnp.stack([self.audio_embed(codes[:, i], i) for i in range(k - 1)], axis=1)
        inputs = jnp.concatenate([last_hidden[:, None].astype(embeds.dtype), embeds], axis=1)  # [B, K, D_b]
        positions = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
        h, _ = self.decoder_step(inputs, positions, None)
        dt = self.cfg.compute_dtype
        logits = jnp.einsum("bid,ivd->biv", h[:, 1:].astype(dt), self.audio_head.astype(dt),
                            preferred_element_type=jnp.float32)
        scale = optional_param(self, "audio_head_scale")
        return logits if scale is None else logits * scale.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Initialisation entry: backbone logits and teacher-forced depth logits of the last row."""
        logits, hidden = self.backbone_forward(tokens, mask)
        return logits, self.depth_forward(hidden[:, -1], tokens[:, -1, : self.cfg.num_codebooks])
