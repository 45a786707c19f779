"""The alignment guidance of the CSM loss (`csm_jax.training.loss`, `align_weight`): the turn layout read from the
row masks, the penalty against a plain per-row loop, its extremes, and its place in the loss and its gradient."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.csm.prompt import PromptFormat, concat
from csm_jax.default_model import byte_tokenizer
from csm_jax.training.loss import LossConfig, alignment_penalty, compute_loss, turn_layout
from csm_jax.training.state import init_params
from csm_jax.training.synthetic import tiny_config

CFG = tiny_config()
K, V = CFG.num_codebooks, CFG.audio_vocab_size
S = 48


def _conversation(rng: np.random.Generator, turns: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of turns (text, audio frames) in the one prompt format, padded to S rows."""
    fmt = PromptFormat(byte_tokenizer(), K, V)
    parts = []
    for i, (text, frames) in enumerate(turns):
        parts += [fmt.text_rows(text, i % 2), fmt.code_rows(rng.integers(1, V, (frames, K)))]
    tokens, mask = concat(parts)
    pad = S - len(tokens)
    return np.pad(tokens, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = [_conversation(rng, [("hi", 5), ("yes ok", 9)]), _conversation(rng, [("a longer one", 12)])]
    tokens, mask = (np.stack(x) for x in zip(*rows, strict=True))
    tokens[..., K] %= CFG.text_vocab_size  # the tiny model's text vocabulary is smaller than the byte tokenizer's
    targets = mask[..., 0].copy()
    return {"tokens": tokens, "mask": mask, "targets": targets}


def _turns(mask: np.ndarray) -> list[tuple[range, range]]:
    """(text rows, audio rows) of each turn of one sequence, by walking the rows."""
    text, audio = mask[:, K], mask[:, :K].any(-1) & ~mask[:, K]
    turns, i = [], 0
    while i < len(text):
        if not text[i]:
            i += 1
            continue
        j = i
        while j < len(text) and text[j]:
            j += 1
        e = j
        while e < len(text) and audio[e]:
            e += 1
        turns.append((range(i, j), range(j, e)))
        i = e
    return turns


def test_turn_layout_matches_a_walk_over_the_rows(batch):
    lay = {k: np.asarray(v) for k, v in turn_layout(jnp.asarray(batch["mask"]), K).items()}
    for b in range(2):
        turns = _turns(batch["mask"][b])
        assert len(turns) == (2 if b == 0 else 1)
        for n, (text, audio) in enumerate(turns, 1):
            for r in [*text, *audio]:
                assert lay["turn"][b, r] == n
                assert lay["text_start"][b, r] == text.start
                assert lay["text_rows"][b, r] == len(text) and lay["audio_rows"][b, r] == len(audio)
            for r in audio:
                assert lay["audio"][b, r] and not lay["text"][b, r] and lay["audio_start"][b, r] == audio.start


def _reference_penalty(probs: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """The penalty of every row that predicts an audio frame, from the per-sequence walk (NaN elsewhere)."""
    b, h, s, _ = probs.shape
    out = np.full((b, s - 1), np.nan)
    for i in range(b):
        for text, audio in _turns(mask[i]):
            for f in audio:
                tp = (f - audio.start + 0.5) / len(audio)
                mass = sum(probs[i, :, f - 1, j].mean() * math.exp(-((tp - (j - text.start + 0.5) / len(text)) ** 2)
                                                                  / (2 * sigma**2)) for j in text)
                out[i, f - 1] = 1.0 - mass
    return out


def test_penalty_equals_the_per_row_reference(batch):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, S, S)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = np.asarray(alignment_penalty(jnp.asarray(probs, jnp.float32), jnp.asarray(batch["mask"]), K, 0.2))
    ref = _reference_penalty(probs, batch["mask"], 0.2)
    scored = ~np.isnan(ref)
    assert scored.sum() == (5 + 1) + (9 + 1) + (12 + 1)  # every audio row of every turn, end frames included
    np.testing.assert_allclose(got[scored], ref[scored], rtol=1e-5, atol=1e-6)


def test_penalty_is_near_zero_on_the_diagonal_and_one_off_the_text(batch):
    mask = batch["mask"]
    diag = np.zeros((2, 1, S, S), np.float32)
    elsewhere = np.zeros_like(diag)
    scored = np.zeros((2, S - 1), bool)
    for b in range(2):
        for text, audio in _turns(mask[b]):
            for f in audio:
                j = text.start + min(int((f - audio.start + 0.5) / len(audio) * len(text)), len(text) - 1)
                diag[b, 0, f - 1, j] = 1.0
                elsewhere[b, 0, f - 1, f - 1] = 1.0  # the row itself: audio, or the turn's last text row...
                if f == audio.start:  # ... which is text: put the first frame's query on an earlier turn or row 0
                    elsewhere[b, 0, f - 1, f - 1] = 0.0
                    elsewhere[b, 0, f - 1, 0 if text.start else S - 1] = 1.0
                scored[b, f - 1] = True
    near = np.asarray(alignment_penalty(jnp.asarray(diag), jnp.asarray(mask), K, 0.2))[scored]
    assert near.max() < 0.2 and near.mean() < 0.05
    far = np.asarray(alignment_penalty(jnp.asarray(elsewhere), jnp.asarray(mask), K, 0.2))[scored]
    first_turn_first_frame = far < 1.0  # row 0 is the first turn's own first text row: band mass, not zero
    assert first_turn_first_frame.sum() <= 2 and np.all(far[~first_turn_first_frame] == 1.0)


def test_loss_adds_the_weighted_penalty_and_its_gradient_lowers_it(batch):
    params = backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0))
    key = jax.random.key(3)
    base = LossConfig(depth_fraction=1.0)
    guided = LossConfig(depth_fraction=1.0, align_weight=2.0, align_layer=0, align_heads=2)
    _, m0 = compute_loss(params, batch, key, CFG, base)
    _, m1 = compute_loss(params, batch, key, CFG, guided)
    assert "align_loss" not in m0 and 0.0 < float(m1["align_loss"]) <= 1.0
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]) + 2.0 * float(m1["align_loss"]), rtol=1e-5)

    def align(p):
        return compute_loss(p, batch, key, CFG, guided)[1]["align_loss"]

    grad = jax.jit(jax.grad(align))
    before, p = float(align(params)), params
    for _ in range(20):
        p = jax.tree.map(lambda x, g: x - 0.5 * g, p, grad(p))
    assert float(align(p)) < before - 0.05
    g = grad(params)["backbone"]  # layers above align_layer do not feed the guided heads
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["layers_1"]))


def test_alignment_settings_are_checked(batch):
    with pytest.raises(ValueError, match="align_sigma"):
        LossConfig(align_weight=1.0, align_sigma=0.0)
    with pytest.raises(ValueError, match="align_layer 99"):
        compute_loss(None, batch, jax.random.key(0), CFG, LossConfig(align_weight=1.0, align_layer=99))
