"""The amortised training loss equals a plain per-frame reference (each sequence run alone and unpadded, each frame
scored on its own) on exactly the frames it draws; with depth_fraction=1 it is the full per-frame loss; padding,
masked columns and non-target rows do not count."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.training.loss import (LossConfig, compute_loss, eligible_frames, num_depth_slots, reference_loss,
                                   select_depth_frames)
from csm_jax.training.state import init_params
from csm_jax.training.synthetic import synthetic_batch, tiny_config

CFG = tiny_config()
K = CFG.num_codebooks


@pytest.fixture(scope="module")
def params():
    return backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0))


def _batch() -> dict[str, np.ndarray]:
    """4 sequences (two lengths, padded to 20): text, context audio, target audio + end frame; sequence 1 has
    codebook 3 masked (filler in that column) on its audio rows."""
    batch = synthetic_batch(CFG, 4, 20, rng=3, lengths=[20, 13, 20, 13])
    audio = batch["mask"][1, :, 0]
    batch["mask"][1, audio, 3] = False
    batch["tokens"][1, audio, 3] = 17
    return batch


_loss = jax.jit(compute_loss, static_argnums=(3, 4))


def _frames(selection) -> list[tuple[int, int]]:
    return [(int(b), int(t)) for b, t, v in zip(*map(np.asarray, selection)) if v]


def _assert_metrics_equal(got: dict, ref: dict) -> None:
    for name in ("loss", "c0_loss", "depth_loss", "c0_accuracy", "cb_loss"):
        np.testing.assert_allclose(np.asarray(got[name]), ref[name], rtol=2e-5, atol=2e-6, err_msg=name)
    for name in ("c0_frames", "depth_frames", "depth_tokens"):
        assert float(got[name]) == float(ref[name]), name


def test_amortised_loss_equals_reference_on_selected_frames(params):
    batch = _batch()
    eligible = np.asarray(eligible_frames(batch))
    n_eligible = int(eligible.sum())
    assert n_eligible == int((batch["targets"][:, 1:]).sum())  # targets never sit at t = 0 here
    for cfg, seed in [(LossConfig(depth_fraction=1 / 8), 1), (LossConfig(depth_fraction=1 / 8), 2),
                      (LossConfig(depth_fraction=1 / 2, depth_max_frames=5, c0_weight=0.5, depth_weight=2.0), 3)]:
        key = jax.random.key(seed)
        m_slots = num_depth_slots(cfg, 4, 20)
        assert m_slots == (5 if cfg.depth_max_frames else math.ceil(80 / 8))
        frames = _frames(select_depth_frames(key, eligible_frames(batch), cfg))
        assert len(frames) == len(set(frames)) == min(m_slots, n_eligible)
        assert all(eligible[b, t] for b, t in frames)

        loss, metrics = _loss(params, batch, key, CFG, cfg)
        ref = reference_loss(params, batch, CFG, cfg, depth_frames=frames)
        _assert_metrics_equal(metrics, ref)
        np.testing.assert_allclose(float(loss), ref["loss"], rtol=2e-5)
        assert ref["depth_tokens"] < len(frames) * (K - 1) or all(b != 1 for b, _ in frames)  # masked codebook 3

    # different keys draw different frames
    draws = {tuple(_frames(select_depth_frames(jax.random.key(s), eligible_frames(batch), LossConfig(1 / 8))))
             for s in range(5)}
    assert len(draws) > 1


def test_full_fraction_is_the_per_frame_loss(params):
    batch = _batch()
    ref = reference_loss(params, batch, CFG, LossConfig(depth_fraction=1.0))
    assert ref["depth_frames"] == ref["c0_frames"] == eligible_frames(batch).sum()
    for selection in ("batch", "row"):
        _, metrics = _loss(params, batch, jax.random.key(0), CFG, LossConfig(depth_fraction=1.0,
                                                                             depth_selection=selection))
        _assert_metrics_equal(metrics, ref)
    # codebook 3 is masked on sequence 1's frames: fewer tokens there than for codebooks 1 and 2
    n1 = sum(1 for b, _ in ref["frames"] if b == 1)
    assert n1 > 0 and ref["depth_tokens"] == ref["depth_frames"] * (K - 1) - n1


def test_padding_masked_columns_and_non_targets_do_not_count(params):
    batch = _batch()
    cfg = LossConfig(depth_fraction=1.0)
    key = jax.random.key(0)
    _, base = _loss(params, batch, key, CFG, cfg)

    # other filler in padding rows and in masked columns; target flags on padding and text rows
    noisy = {name: x.copy() for name, x in batch.items()}
    rng = np.random.default_rng(9)
    filler = rng.integers(0, CFG.audio_vocab_size, noisy["tokens"].shape)
    noisy["tokens"] = np.where(noisy["mask"], noisy["tokens"], filler).astype(np.int32)
    noisy["targets"] |= ~noisy["mask"][..., 0]
    _, metrics = _loss(params, noisy, key, CFG, cfg)
    for name in base:
        np.testing.assert_array_equal(np.asarray(metrics[name]), np.asarray(base[name]), err_msg=name)

    # an audio row 0 flagged as target has no previous row to predict it: not counted
    first = {name: x.copy() for name, x in batch.items()}
    first["mask"][:, 0, :K] = True
    _, without = _loss(params, first, key, CFG, cfg)
    first["targets"][:, 0] = True
    _, flagged = _loss(params, first, key, CFG, cfg)
    for name in base:
        np.testing.assert_array_equal(np.asarray(flagged[name]), np.asarray(without[name]), err_msg=name)

    # one target frame left: the loss is that frame's codebook-0 and depth cross-entropies
    one = {name: x.copy() for name, x in batch.items()}
    b, t = 2, int(np.nonzero(batch["targets"][2])[0][3])
    one["targets"][:] = False
    one["targets"][b, t] = True
    _, metrics = _loss(params, one, key, CFG, cfg)
    ref = reference_loss(params, one, CFG, cfg)
    assert ref["frames"] == [(b, t)]
    assert float(metrics["c0_frames"]) == 1 and float(metrics["depth_frames"]) == 1
    _assert_metrics_equal(metrics, ref)


def test_context_rows_read_all_codebooks_and_target_rows_the_spoken_ones(params):
    """`context_codebooks`: the loss reads context audio rows with all K codebooks and the target turn's rows with
    `input_codebooks`, as generation reads a prompt and the frames it feeds back; the reference narrows the target
    rows itself. Same parameters, three readings, three different codebook-0 losses."""
    batch = _batch()
    cfg, key = LossConfig(depth_fraction=1.0), jax.random.key(0)
    split = CFG.replace(input_codebooks=1, context_codebooks=K)
    _, metrics = _loss(params, batch, key, split, cfg)
    _assert_metrics_equal(metrics, reference_loss(params, batch, split, cfg))
    others = [float(_loss(params, batch, key, c, cfg)[1]["c0_loss"]) for c in (CFG, CFG.replace(input_codebooks=1))]
    assert len({float(metrics["c0_loss"]), *others}) == 3
    # reading every codebook of the target rows too is the plain model's reading (context_codebooks = input = K)
    _, every = _loss(params, batch, key, CFG.replace(context_codebooks=K), cfg)
    assert float(every["c0_loss"]) == others[0]
    with pytest.raises(ValueError, match="context_codebooks \\(1\\) must be at least input_codebooks \\(2\\)"):
        CFG.replace(input_codebooks=2, context_codebooks=1)
