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

Alignment guidance (optional, `align_weight` > 0): a decoder-only TTS must learn to read its text monotonically,
and a small model learns it slowly (it reads the first words, then loses its place). As guided attention does for
attention TTS (Tachibana et al., 2017, "DC-TTS"), a penalty pulls `align_heads` query heads of backbone layer
`align_layer` onto a diagonal band over the turn's own text: for the row that predicts audio frame t of a turn with
T audio rows and n text rows, penalty = 1 - sum_j p(j) exp(-(t'/T - j'/n)^2 / (2 sigma^2)) over the turn's text rows
j (t', j': offsets within the turn, +0.5), so attention anywhere else costs 1. Training only: inference is the
unchanged CSM.

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
from csm_jax.csm.model import Csm, spoken_mask

LossStats = dict[str, jax.Array]  # c0_sum, c0_count, c0_correct: []; cb_sum, cb_count: [K-1]; depth_frames: []


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """depth_fraction: share of the B * S rows given a depth-decoder slot (1.0: every target frame);
    depth_max_frames: optional cap on the slots per (micro-)batch; depth_selection: "batch" draws the slots among
    all target frames of the batch, "row" draws ceil(depth_fraction * S) slots in each sequence (keeps the frame
    gather local to a batch shard); c0_weight / depth_weight: weights of the two mean losses; align_weight: weight
    of the alignment guidance (0: off) on the first `align_heads` query heads of backbone layer `align_layer`,
    band width `align_sigma` (a fraction of the turn)."""

    depth_fraction: float = 1 / 16
    depth_max_frames: int | None = None
    depth_selection: str = "batch"
    c0_weight: float = 1.0
    depth_weight: float = 1.0
    align_weight: float = 0.0
    align_layer: int = 2
    align_heads: int = 1
    align_sigma: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.depth_fraction <= 1.0:
            raise ValueError(f"depth_fraction must be in (0, 1], got {self.depth_fraction}")
        if self.depth_max_frames is not None and self.depth_max_frames < 1:
            raise ValueError(f"depth_max_frames must be >= 1, got {self.depth_max_frames}")
        if self.depth_selection not in ("batch", "row"):
            raise ValueError(f"depth_selection must be 'batch' or 'row', got {self.depth_selection!r}")
        if self.align_weight < 0 or self.align_sigma <= 0 or self.align_layer < 0 or self.align_heads < 1:
            raise ValueError("align_weight must be >= 0, align_sigma > 0, align_layer >= 0 and align_heads >= 1")


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


def turn_layout(mask: jax.Array, num_codebooks: int) -> dict[str, jax.Array]:
    """Where each row's turn is, from the row masks (bool [B, S, K+1]; a turn is its text rows, then its audio
    rows) -> int32 [B, S] each: `turn` (1, 2, ... from each turn's first text row; 0 before the first turn),
    `text_start` / `audio_start` (first text / audio row of the row's turn; audio_start is valid on audio rows),
    `text_rows` / `audio_rows` (the turn's counts); and bool [B, S] `text`, `audio`."""
    b, s = mask.shape[:2]
    text = mask[..., num_codebooks]
    audio = jnp.any(mask[..., :num_codebooks], axis=-1) & ~text
    prev_text = jnp.pad(text[:, :-1], ((0, 0), (1, 0)))
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    turn = jnp.cumsum(text & ~prev_text, axis=1, dtype=jnp.int32)
    text_start = jax.lax.cummax(jnp.where(text & ~prev_text, rows, 0), axis=1)
    audio_start = jax.lax.cummax(jnp.where(audio & prev_text, rows, 0), axis=1)

    def per_turn(x: jax.Array, t: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(x.astype(jnp.int32), t, num_segments=s + 1)[t]

    return {"turn": turn, "text_start": text_start, "audio_start": audio_start, "text": text, "audio": audio,
            "text_rows": jax.vmap(per_turn)(text, turn), "audio_rows": jax.vmap(per_turn)(audio, turn)}


def alignment_penalty(probs: jax.Array, mask: jax.Array, num_codebooks: int, sigma: float) -> jax.Array:
    """probs float [B, H, S, S] (attention of query row over key rows), mask bool [B, S, K+1] -> float32 [B, S-1]:
    for the row t-1 that predicts frame t, 1 - the mean over heads of the attention mass on the diagonal band of
    t's turn's text (module docstring). Rows that predict no audio frame get values too; callers weight them out."""
    lay = turn_layout(mask, num_codebooks)
    f = {name: x[:, 1:] for name, x in lay.items()}  # the predicted frame's turn, for query rows 0..S-2
    s = mask.shape[1]
    frame = jnp.arange(1, s, dtype=jnp.float32)[None]
    t_pos = (frame - f["audio_start"] + 0.5) / jnp.maximum(f["audio_rows"], 1)  # [B, S-1]
    keys = jnp.arange(s, dtype=jnp.float32)[None, None]  # [1, 1, S]
    j_pos = (keys - f["text_start"][..., None] + 0.5) / jnp.maximum(f["text_rows"], 1)[..., None]  # [B, S-1, S]
    own = lay["text"][:, None, :] & (lay["turn"][:, None, :] == f["turn"][..., None])
    band = jnp.where(own, jnp.exp(-jnp.square(t_pos[..., None] - j_pos) / (2 * sigma**2)), 0.0)
    mass = jnp.einsum("bhqk,bqk->bq", probs[:, :, :-1].astype(jnp.float32), band) / probs.shape[1]
    return 1.0 - mass


def _backbone_attention(intermediates: Any, layer: int, num_heads: int, num_kv_heads: int, heads: int) -> jax.Array:
    """The sown attention of backbone layer `layer` ([B * Hkv, R, S, S]) -> its first `heads` query heads
    [B, heads, S, S] (query head g * R + i is KV group g's i-th)."""
    probs = intermediates["backbone"][f"layers_{layer}"]["self_attn"]["probs"][0]
    _, _, q, k = probs.shape
    return probs.reshape(-1, num_heads, q, k)[:, :heads]


def loss_stats(
    params: Any, batch: dict[str, Any], selection: tuple[jax.Array, jax.Array, jax.Array], model_cfg: CsmConfig,
    cfg: LossConfig = LossConfig(),
) -> LossStats:
    """Summed cross-entropies and counts of one (micro-)batch, depth decoder on the `selection` slots; with
    `cfg.align_weight` > 0 also the summed alignment penalty of the codebook-0 frames (`align_sum`)."""
    model = Csm(model_cfg)
    k = model_cfg.num_codebooks
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    codes = jnp.where(mask[..., :k], tokens[..., :k], 0)
    reads = spoken_mask(mask, jnp.asarray(batch["targets"]), model_cfg)  # the target turn is read as spoken
    align = cfg.align_weight > 0
    if align:
        bb = model_cfg.backbone
        if cfg.align_layer >= bb.num_layers or cfg.align_heads > bb.num_heads:
            raise ValueError(f"align_layer {cfg.align_layer} / align_heads {cfg.align_heads} outside the backbone "
                             f"({bb.num_layers} layers, {bb.num_heads} heads)")
        (logits, hidden), inter = model.apply({"params": params}, tokens, reads, method=Csm.backbone_forward,
                                              mutable=["intermediates"])
        probs = _backbone_attention(inter["intermediates"], cfg.align_layer, bb.num_heads, bb.num_kv_heads,
                                    cfg.align_heads)
    else:
        logits, hidden = model.apply({"params": params}, tokens, reads, method=Csm.backbone_forward)

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
    stats = {
        "c0_sum": jnp.sum(ce0 * w0),
        "c0_count": jnp.sum(w0),
        "c0_correct": jnp.sum(correct * w0),
        "cb_sum": jnp.sum(ced * wd, axis=0),
        "cb_count": jnp.sum(wd, axis=0),
        "depth_frames": jnp.sum(valid.astype(jnp.float32)),
    }
    if align:
        stats["align_sum"] = jnp.sum(alignment_penalty(probs, mask, k, cfg.align_sigma) * w0)
    return stats


def weighted_loss(stats: LossStats, cfg: LossConfig, c0_count: jax.Array, depth_count: jax.Array) -> jax.Array:
    """The training objective of `stats` normalised by the given totals (those of the whole batch, so that
    micro-batch gradients add up to the full-batch gradient)."""
    loss = (cfg.c0_weight * stats["c0_sum"] / jnp.maximum(c0_count, 1.0)
            + cfg.depth_weight * jnp.sum(stats["cb_sum"]) / jnp.maximum(depth_count, 1.0))
    if "align_sum" in stats:
        loss = loss + cfg.align_weight * stats["align_sum"] / jnp.maximum(c0_count, 1.0)
    return loss


def finalize(stats: LossStats, cfg: LossConfig, xp: Any = jnp) -> dict[str, jax.Array]:
    """Sums and counts -> loss (weighted c0 mean + depth mean, + the weighted alignment penalty when `stats`
    has it), c0_loss, depth_loss, c0_accuracy, cb_loss [K] (codebook 0 then the depth codebooks), c0_frames,
    depth_frames, depth_tokens, and align_loss (the mean penalty) when `stats` has it.
    `xp`: jax.numpy, or numpy for host-side (float64) statistics."""
    c0n = xp.maximum(stats["c0_count"], 1.0)
    dn = xp.sum(stats["cb_count"])
    c0_loss = stats["c0_sum"] / c0n
    depth_loss = xp.sum(stats["cb_sum"]) / xp.maximum(dn, 1.0)
    cb = stats["cb_sum"] / xp.maximum(stats["cb_count"], 1.0)
    out = {
        "loss": cfg.c0_weight * c0_loss + cfg.depth_weight * depth_loss,
        "c0_loss": c0_loss,
        "depth_loss": depth_loss,
        "c0_accuracy": stats["c0_correct"] / c0n,
        "cb_loss": xp.concatenate([xp.reshape(c0_loss, (1,)), cb]),
        "c0_frames": stats["c0_count"],
        "depth_frames": stats["depth_frames"],
        "depth_tokens": dn,
    }
    if "align_sum" in stats:
        out["align_loss"] = stats["align_sum"] / c0n
        out["loss"] = out["loss"] + cfg.align_weight * out["align_loss"]
    return out


def compute_loss(
    params: Any, batch: dict[str, Any], key: jax.Array, model_cfg: CsmConfig, cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one batch; `key` draws the depth-decoder frames."""
    selection = select_depth_frames(key, eligible_frames(batch), cfg)
    metrics = finalize(loss_stats(params, batch, selection, model_cfg, cfg), cfg)
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
    reads = mask.copy()
    reads[..., model_cfg.backbone_codebooks:k] &= ~targets[..., None]  # target rows: the spoken codebooks only
    hidden_of, c0_sum, c0_count, c0_correct = {}, 0.0, 0, 0
    eligible = set()
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        if n == 0:
            continue
        logits, hidden = backbone(params, tokens[b : b + 1, :n], reads[b : b + 1, :n])
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
