"""Training-time split residual VQ with EMA codebooks, as Mimi keeps them.

Each codebook level holds `embed_sum` float32 [bins, dim] and `cluster_usage` float32 [bins] (the official
checkpoint form); the centroid is `embed_sum / max(cluster_usage, eps)`. Codebooks are not trained by gradient:
after each step the EMA takes the batch's assignment counts and vector sums. Codes whose usage falls under
`dead_ratio * total / bins` are replaced by residuals drawn from the batch. The encoder gets a commitment loss and
the decoder a straight-through estimate. Quantizer dropout keeps a random number of acoustic levels per sequence,
so one model decodes any number of codebooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from csm_jax.codec.config import MimiConfig

EPS = 1e-5
HALVES = ("semantic", "acoustic")


@dataclasses.dataclass(frozen=True)
class RVQConfig:
    """decay: EMA decay of usage and sums; dead_ratio: usage threshold relative to uniform use;
    dropout_prob: fraction of sequences that keep a random number (1..n) of acoustic levels;
    quantize_prob: fraction of sequences whose latent is quantized at all (Mimi trains with 0.5; the rest
    pass the continuous latent to the decoder)."""

    decay: float = 0.99
    dead_ratio: float = 0.1
    dropout_prob: float = 0.5
    quantize_prob: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"rvq.decay must be in (0, 1), got {self.decay}")
        for name in ("dead_ratio", "dropout_prob", "quantize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"rvq.{name} must be in [0, 1], got {getattr(self, name)}")


def init_ema(cfg: MimiConfig) -> dict[str, Any]:
    """Empty EMA state: per half {embed_sum [K, bins, dim], cluster_usage [K, bins]}, plus `initialized` []."""
    n = {"semantic": cfg.num_semantic_quantizers, "acoustic": cfg.num_quantizers - cfg.num_semantic_quantizers}
    ema: dict[str, Any] = {
        half: {"embed_sum": jnp.zeros((n[half], cfg.codebook_size, cfg.codebook_dim), jnp.float32),
               "cluster_usage": jnp.zeros((n[half], cfg.codebook_size), jnp.float32)}
        for half in HALVES
    }
    ema["initialized"] = jnp.zeros((), jnp.bool_)
    return ema


def ema_from_codebooks(params: dict[str, Any], cfg: MimiConfig) -> dict[str, Any]:
    """EMA state whose centroids are exactly the codebooks of inference Mimi params (usage 1 per code)."""
    ema: dict[str, Any] = {"initialized": jnp.ones((), jnp.bool_)}
    for half in HALVES:
        books = jnp.array(params["quantizer"][half]["codebooks"], jnp.float32)  # a copy
        ema[half] = {"embed_sum": books, "cluster_usage": jnp.ones(books.shape[:2], jnp.float32)}
    return ema


def centroids(ema_half: dict[str, jax.Array]) -> jax.Array:
    """float32 [K, bins, dim] effective codebooks."""
    return ema_half["embed_sum"] / jnp.maximum(ema_half["cluster_usage"], EPS)[..., None]


def with_codebooks(params: dict[str, Any], ema: dict[str, Any]) -> dict[str, Any]:
    """Mimi params with the quantizer codebooks set to the EMA centroids (what inference uses)."""
    quantizer = dict(params["quantizer"])
    for half in HALVES:
        quantizer[half] = dict(quantizer[half]) | {"codebooks": centroids(ema[half])}
    return dict(params) | {"quantizer": quantizer}


def _project(half_params: dict[str, Any], name: str, x: jax.Array) -> jax.Array:
    return x @ half_params[name]["kernel"] if name in half_params else x


def _assign(residual: jax.Array, book: jax.Array) -> jax.Array:
    """residual [N, dim], book [bins, dim] -> nearest index int32 [N] (squared distance, fp32)."""
    dist = jnp.sum(book**2, -1)[None] - 2.0 * jnp.dot(residual, book.T, precision="highest")
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _quantize_half(x: jax.Array, ema_half: dict[str, jax.Array], keep: jax.Array, initialized: jax.Array,
                   key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """x float32 [N, dim]; keep float32 [N, K] (1 where level k is used for that frame).

    -> (quantized sum [N, dim], codes int32 [N, K], commitment loss [], batch stats {counts [K, bins],
    sums [K, bins, dim], samples [K, bins, dim]}, first-step codebooks [K, bins, dim])."""
    n_levels, bins, _ = ema_half["embed_sum"].shape
    books = centroids(ema_half)
    residual, total = x, jnp.zeros_like(x)
    codes, counts, sums, samples, fresh = [], [], [], [], []
    commit = jnp.zeros((), jnp.float32)
    for level, level_key in enumerate(jax.random.split(key, n_levels)):
        # Replacement / initial vectors: batch residuals plus 10 % noise, so codes drawn from the same vector
        # differ and a batch with fewer frames than bins still leaves residuals for the next level.
        pick_key, noise_key = jax.random.split(level_key)
        pick = jax.random.randint(pick_key, (bins,), 0, x.shape[0])
        res = jax.lax.stop_gradient(residual)
        noise = jax.random.normal(noise_key, (bins, res.shape[1])) * 0.1 * jnp.std(res, axis=0)
        draw = res[pick] + noise
        book = jnp.where(initialized, books[level], draw)
        idx = _assign(res, book)
        q = book[idx]
        w = keep[:, level : level + 1]
        commit = commit + jnp.sum(w * (residual - jax.lax.stop_gradient(q)) ** 2) / jnp.maximum(
            jnp.sum(w) * x.shape[1], 1.0)
        onehot = jax.nn.one_hot(idx, bins, dtype=jnp.float32) * w
        counts.append(jnp.sum(onehot, 0))
        sums.append(onehot.T @ res)
        samples.append(draw)
        fresh.append(book)
        codes.append(idx)
        total = total + w * q
        residual = residual - w * q
    stats = {"counts": jnp.stack(counts), "sums": jnp.stack(sums), "samples": jnp.stack(samples)}
    return total, jnp.stack(codes, -1), commit, stats, jnp.stack(fresh)


def quantize(qparams: dict[str, Any], ema: dict[str, Any], latent: jax.Array, cfg: MimiConfig, rvq: RVQConfig,
             key: jax.Array, num_acoustic: int | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Training forward of the split RVQ.

    latent float32 [B, T, hidden] -> (decoder input float32 [B, T, hidden], aux) where aux holds `commit` (loss),
    `codes` int32 [B, T, K], `semantic` (the semantic half's quantized output [B, T, hidden], for distillation),
    `stats` (EMA batch statistics per half) and `fresh` (first-step codebooks). `num_acoustic` fixes the acoustic
    levels for every sequence (evaluation); otherwise quantizer dropout samples them."""
    b, t, _ = latent.shape
    k_drop, k_quant, k_sem, k_ac = jax.random.split(key, 4)
    n_ac = cfg.num_quantizers - cfg.num_semantic_quantizers
    if num_acoustic is None:
        random_n = jax.random.randint(k_drop, (b,), 1, n_ac + 1)
        dropped = jax.random.uniform(jax.random.fold_in(k_drop, 1), (b,)) < rvq.dropout_prob
        n_keep = jnp.where(dropped, random_n, n_ac)
        quantized = jax.random.uniform(k_quant, (b,)) < rvq.quantize_prob
    else:
        n_keep = jnp.full((b,), num_acoustic)
        quantized = jnp.ones((b,), jnp.bool_)
    frame_keep = lambda n: jnp.repeat((jnp.arange(n)[None] < n_keep[:, None]).astype(jnp.float32), t, 0)  # noqa: E731
    keeps = {"semantic": jnp.ones((b * t, cfg.num_semantic_quantizers), jnp.float32),
             "acoustic": frame_keep(n_ac) if n_ac else None}
    out, aux = jnp.zeros((b, t, cfg.hidden_size), jnp.float32), {"stats": {}, "fresh": {}}
    commit, codes = jnp.zeros((), jnp.float32), []
    for half, half_key in zip(HALVES, (k_sem, k_ac)):
        p = qparams[half]
        x = _project(p, "input_proj", latent.astype(jnp.float32)).reshape(b * t, -1)
        q, c, loss, stats, fresh = _quantize_half(x, ema[half], keeps[half], ema["initialized"], half_key)
        q_st = x + jax.lax.stop_gradient(q - x)
        # Levels dropped for a sequence contribute nothing: the straight-through sum covers only kept levels.
        y = _project(p, "output_proj", q_st.reshape(b, t, -1))
        if half == "semantic":
            aux["semantic"] = y
        out = out + y
        commit, codes = commit + loss, codes + [c.reshape(b, t, -1)]
        aux["stats"][half], aux["fresh"][half] = stats, fresh
    out = jnp.where(quantized[:, None, None], out, latent.astype(jnp.float32))
    aux |= {"commit": commit, "codes": jnp.concatenate(codes, -1)}
    return out, aux


def update_ema(ema: dict[str, Any], aux: dict[str, Any], rvq: RVQConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """EMA step from `quantize`'s aux -> (new EMA state, metrics {replaced codes, perplexity per half})."""
    new: dict[str, Any] = {"initialized": jnp.ones((), jnp.bool_)}
    metrics = {}
    first = jnp.logical_not(ema["initialized"])
    for half in HALVES:
        old, stats = ema[half], aux["stats"][half]
        bins = old["cluster_usage"].shape[-1]
        # First step: start from the batch-drawn codebooks, each with the usage a replaced code gets.
        frames = jnp.sum(stats["counts"], -1, keepdims=True)
        init_usage = jnp.broadcast_to(2.0 * rvq.dead_ratio * frames / bins, old["cluster_usage"].shape)
        start_usage = jnp.where(first, init_usage, old["cluster_usage"])
        start_sum = jnp.where(first, aux["fresh"][half] * start_usage[..., None], old["embed_sum"])
        usage = rvq.decay * start_usage + (1 - rvq.decay) * stats["counts"]
        embed_sum = rvq.decay * start_sum + (1 - rvq.decay) * stats["sums"]
        threshold = rvq.dead_ratio * jnp.sum(usage, -1, keepdims=True) / bins
        dead = usage < threshold
        fresh_usage = 2.0 * threshold
        usage = jnp.where(dead, fresh_usage, usage)
        embed_sum = jnp.where(dead[..., None], stats["samples"] * fresh_usage[..., None], embed_sum)
        new[half] = {"embed_sum": embed_sum, "cluster_usage": usage}
        probs = stats["counts"] / jnp.maximum(jnp.sum(stats["counts"], -1, keepdims=True), 1.0)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-12)), 0.0), -1)
        metrics[f"{half}_perplexity"] = jnp.exp(entropy)  # [K]
        metrics[f"{half}_replaced"] = jnp.sum(dead, -1).astype(jnp.float32)
    return new, metrics
