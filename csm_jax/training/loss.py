"""CSM training loss: codebook 0 from the backbone on every target frame, codebooks 1..K-1 from the depth decoder on
a random, compute-amortised subset of target frames (Sesame's "1/16 of frames"; transformers'
`depth_decoder_labels_ratio`).

Batch (numpy or jax arrays): `tokens` int32 [B, S, K+1], `mask` bool [B, S, K+1], `targets` bool [B, S] (rows whose
audio codes are predicted). The backbone hidden state of row t-1 predicts row t, so a target at t = 0 has nothing
to predict it and is ignored.

Shapes stay static under `jit`: the depth decoder runs on a fixed number of frame slots,
M = min(ceil(depth_fraction * B * S), depth_max_frames); slots are drawn without replacement among the eligible
target frames (Gumbel top-k) and slots beyond the number of eligible frames are masked. Note the fraction is of
all B * S rows, so when targets are a part of each sequence, a larger share of them is sampled.

Losses are kept as sums and counts (`LossStats`) so that micro-batches and eval batches add up exactly;
`finalize` turns them into means.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csm_jax.csm.config import CsmConfig
from csm_jax.csm.model import Csm

LossStats = dict[str, jax.Array]  # c0_sum, c0_count, c0_correct: []; cb_sum, cb_count: [K-1]; depth_frames: []


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """depth_fraction: share of the B * S rows given a depth-decoder slot (1.0: every target frame);
    depth_max_frames: optional cap on the slots per (micro-)batch; depth_selection: "batch" draws the slots among
    all target frames of the batch, "row" draws ceil(depth_fraction * S) slots in each sequence (keeps the frame
    gather local to a batch shard); c0_weight / depth_weight: weights of the two mean losses."""

    depth_fraction: float = 1 / 16
    depth_max_frames: int | None = None
    depth_selection: str = "batch"
    c0_weight: float = 1.0
    depth_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.depth_fraction <= 1.0:
            raise ValueError(f"depth_fraction must be in (0, 1], got {self.depth_fraction}")
        if self.depth_max_frames is not None and self.depth_max_frames < 1:
            raise ValueError(f"depth_max_frames must be >= 1, got {self.depth_max_frames}")
        if self.depth_selection not in ("batch", "row"):
            raise ValueError(f"depth_selection must be 'batch' or 'row', got {self.depth_selection!r}")


def eligible_frames(batch: dict[str, Any]) -> jax.Array:
    """bool [B, S]: target rows with a previous row and a codebook-0 column."""
    targets, mask = jnp.asarray(batch["targets"]), jnp.asarray(batch["mask"])
    s = targets.shape[1]
    return targets & mask[..., 0] & (jnp.arange(s) >= 1)[None, :]


def num_depth_slots(cfg: LossConfig, batch_size: int, seq_len: int) -> int:
    """Depth-decoder frame slots per (micro-)batch of shape [batch_size, seq_len]."""
    per = seq_len if cfg.depth_selection == "row" else batch_size * seq_len
    m = math.ceil(cfg.depth_fraction * per - 1e-9)
    if cfg.depth_max_frames is not None:
        cap = cfg.depth_max_frames if cfg.depth_selection == "batch" else math.ceil(cfg.depth_max_frames / batch_size)
        m = min(m, cap)
    m = max(1, min(m, per))
    return m * batch_size if cfg.depth_selection == "row" else m


def select_depth_frames(
    key: jax.Array, eligible: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw the depth-decoder slots: eligible bool [B, S] -> (batch index, row index, valid) int32/int32/bool [M].
    Valid slots are distinct eligible frames, drawn uniformly without replacement; there are
    min(M, #eligible) of them (per sequence in "row" mode)."""
    b, s = eligible.shape
    m = num_depth_slots(cfg, b, s)
    groups = eligible if cfg.depth_selection == "row" else eligible.reshape(1, b * s)
    per_group = m // groups.shape[0]
    scores = jnp.where(groups, jax.random.gumbel(key, groups.shape), -jnp.inf)
    _, idx = jax.lax.top_k(scores, per_group)  # [G, m_g]
    valid = jnp.take_along_axis(groups, idx, axis=1)
    if cfg.depth_selection == "row":
        bi = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], idx.shape)
        ti = idx
    else:
        bi, ti = idx // s, idx % s
    return bi.reshape(-1).astype(jnp.int32), ti.reshape(-1).astype(jnp.int32), valid.reshape(-1)


def loss_stats(
    params: Any, batch: dict[str, Any], selection: tuple[jax.Array, jax.Array, jax.Array], model_cfg: CsmConfig
) -> LossStats:
    """Summed cross-entropies and counts of one (micro-)batch, depth decoder on the `selection` slots."""
    model = Csm(model_cfg)
    k = model_cfg.num_codebooks
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    codes = jnp.where(mask[..., :k], tokens[..., :k], 0)
    logits, hidden = model.apply({"params": params}, tokens, mask, method=Csm.backbone_forward)

    # codebook 0: hidden row t-1 -> code[t, 0]
    w0 = eligible_frames(batch)[:, 1:].astype(jnp.float32)
    pred = logits[:, :-1]
    label = codes[:, 1:, 0]
    ce0 = optax.softmax_cross_entropy_with_integer_labels(pred, label)
    correct = (jnp.argmax(pred, axis=-1) == label).astype(jnp.float32)

    # codebooks 1..K-1: teacher-forced depth decoder on the selected frames
    bi, ti, valid = selection
    last = hidden[bi, jnp.maximum(ti - 1, 0)]  # [M, D]
    frame_codes = codes[bi, ti]  # [M, K]
    wd = (valid[:, None] & mask[bi, ti, 1:k]).astype(jnp.float32)  # [M, K-1]
    depth_logits = model.apply({"params": params}, last, frame_codes, method=Csm.depth_forward)  # [M, K-1, V]
    ced = optax.softmax_cross_entropy_with_integer_labels(depth_logits, frame_codes[:, 1:])
    return {
        "c0_sum": jnp.sum(ce0 * w0),
        "c0_count": jnp.sum(w0),
        "c0_correct": jnp.sum(correct * w0),
        "cb_sum": jnp.sum(ced * wd, axis=0),
        "cb_count": jnp.sum(wd, axis=0),
        "depth_frames": jnp.sum(valid.astype(jnp.float32)),
    }


def weighted_loss(stats: LossStats, cfg: LossConfig, c0_count: jax.Array, depth_count: jax.Array) -> jax.Array:
    """The training objective of `stats` normalised by the given totals (those of the whole batch, so that
    micro-batch gradients add up to the full-batch gradient)."""
    return (cfg.c0_weight * stats["c0_sum"] / jnp.maximum(c0_count, 1.0)
            + cfg.depth_weight * jnp.sum(stats["cb_sum"]) / jnp.maximum(depth_count, 1.0))


def finalize(stats: LossStats, cfg: LossConfig, xp: Any = jnp) -> dict[str, jax.Array]:
    """Sums and counts -> loss (weighted c0 mean + depth mean), c0_loss, depth_loss, c0_accuracy,
    cb_loss [K] (codebook 0 then the depth codebooks), c0_frames, depth_frames, depth_tokens.
    `xp`: jax.numpy, or numpy for host-side (float64) statistics."""
    c0n = xp.maximum(stats["c0_count"], 1.0)
    dn = xp.sum(stats["cb_count"])
    c0_loss = stats["c0_sum"] / c0n
    depth_loss = xp.sum(stats["cb_sum"]) / xp.maximum(dn, 1.0)
    cb = stats["cb_sum"] / xp.maximum(stats["cb_count"], 1.0)
    return {
        "loss": cfg.c0_weight * c0_loss + cfg.depth_weight * depth_loss,
        "c0_loss": c0_loss,
        "depth_loss": depth_loss,
        "c0_accuracy": stats["c0_correct"] / c0n,
        "cb_loss": xp.concatenate([xp.reshape(c0_loss, (1,)), cb]),
        "c0_frames": stats["c0_count"],
        "depth_frames": stats["depth_frames"],
        "depth_tokens": dn,
    }


def compute_loss(
    params: Any, batch: dict[str, Any], key: jax.Array, model_cfg: CsmConfig, cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one batch; `key` draws the depth-decoder frames."""
    selection = select_depth_frames(key, eligible_frames(batch), cfg)
    metrics = finalize(loss_stats(params, batch, selection, model_cfg), cfg)
    return metrics["loss"], metrics


# ------------------------------------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_loss(
    params: Any,
    batch: dict[str, Any],
    model_cfg: CsmConfig,
    cfg: LossConfig = LossConfig(),
    depth_frames: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Plain per-frame loss, for tests: each sequence is run alone and unpadded (its first `lengths[b]` rows), each
    target frame scored on its own in float64 numpy; the depth decoder runs frame by frame on `depth_frames`
    ((b, t) pairs; None: every eligible target frame). Returns `finalize`'s metrics as numpy values."""
    model = Csm(model_cfg)
    k = model_cfg.num_codebooks
    backbone = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Csm.backbone_forward))
    depth = jax.jit(lambda p, h, c: model.apply({"params": p}, h, c, method=Csm.depth_forward))
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    targets, lengths = np.asarray(batch["targets"]), np.asarray(batch["lengths"])
    hidden_of, c0_sum, c0_count, c0_correct = {}, 0.0, 0, 0
    eligible = set()
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        if n == 0:
            continue
        logits, hidden = backbone(params, tokens[b : b + 1, :n], mask[b : b + 1, :n])
        logits, hidden_of[b] = np.asarray(logits[0]), np.asarray(hidden[0])
        for t in range(1, n):
            if targets[b, t] and mask[b, t, 0]:
                eligible.add((b, t))
                lp = _log_softmax(logits[t - 1])
                c0_sum -= lp[tokens[b, t, 0]]
                c0_count += 1
                c0_correct += int(np.argmax(logits[t - 1]) == tokens[b, t, 0])
    frames = sorted(eligible) if depth_frames is None else [tuple(map(int, f)) for f in depth_frames]
    cb_sum, cb_count = np.zeros(k - 1), np.zeros(k - 1)
    for b, t in frames:
        if (b, t) not in eligible:
            raise ValueError(f"frame {(b, t)} is not an eligible target frame")
        codes = np.where(mask[b, t, :k], tokens[b, t, :k], 0)[None]
        logits = np.asarray(depth(params, hidden_of[b][t - 1][None], codes))[0]
        for i in range(1, k):
            if mask[b, t, i]:
                cb_sum[i - 1] -= _log_softmax(logits[i - 1])[codes[0, i]]
                cb_count[i - 1] += 1
    stats = {"c0_sum": np.float64(c0_sum), "c0_count": np.float64(c0_count), "c0_correct": np.float64(c0_correct),
             "cb_sum": cb_sum, "cb_count": cb_count, "depth_frames": np.float64(len(frames))}
    return finalize(stats, cfg, xp=np) | {"frames": frames}
