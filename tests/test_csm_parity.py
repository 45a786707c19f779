"""Offline parity of csm_jax's CSM (backbone c0 head and teacher-forced depth decoder) against transformers'
`CsmForConditionalGeneration` with seeded random weights, loaded from its `save_pretrained` directory.

Shapes `tiny`, `wide`, `rope` (see csm_fixtures) and, marked `full_size`, the CSM-1B architecture. The
`test_reference_*` tests check the oracle itself and need no csm_jax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from csm_fixtures import (  # noqa: F401  (fixtures)
    AUDIO_KEY_BACKBONE,
    AUDIO_KEY_DEPTH,
    AUDIO_KEY_VARIANTS,
    BACKBONE_KINDS,
    CsmReference,
    Port,
    csm_port,
    csm_ref,
    get_port,
    get_reference,
    hf_forward_logits,
    load_port,
    max_abs_diff,
    reference_backbone,
    reference_depth,
    release_full_reference,
    saved_keys,
    shape,
    variant_dir,
)

LOGITS_ATOL = 1e-4  # fp32, absolute; logits and post-norm hidden states have std ~1 (max ~6); measured ~2e-6
FULL_ATOL = 1e-3  # CSM-1B size: 16 + 4 layers of width 2048 / 1024; measured ~1e-5


# ------------------------------------------------------------------------------------ the oracle ---
def test_reference_matches_transformers_forward(csm_ref: CsmReference) -> None:
    """The masked-sum reference equals transformers' own forward for text-only ([B, S] ids) and audio-only
    ([B, S, K] codes) rows, so the mixed/random cases use the same embedding rule as the model."""
    k = csm_ref.config.num_codebooks
    text, audio = csm_ref.backbone["text"], csm_ref.backbone["audio"]
    d_text = max_abs_diff(hf_forward_logits(csm_ref.model, text.tokens[..., k]), text.c0_logits)
    d_audio = max_abs_diff(hf_forward_logits(csm_ref.model, audio.tokens[..., :k]), audio.c0_logits)
    print(f"[{csm_ref.shape}] reference vs transformers forward: text {d_text:.2g}, audio {d_audio:.2g}")
    assert d_text <= 1e-6 and d_audio <= 1e-6


def test_reference_is_not_degenerate(csm_ref: CsmReference) -> None:
    """Logits of order 1 that vary with position, batch item and input; masked columns do not matter."""
    for kind, case in csm_ref.backbone.items():
        std = float(case.c0_logits.std())
        assert 0.5 < std < 3.0, (kind, std)
        assert float(case.c0_logits.std(axis=1).mean()) > 0.3, kind  # varies along the sequence
        assert max_abs_diff(case.c0_logits[0], case.c0_logits[1]) > 0.5, kind
        assert np.isfinite(case.hidden).all()
    assert 0.5 < float(csm_ref.depth.logits.std()) < 3.0
    # scrambling the masked-out ids leaves the reference unchanged (by construction; guards make_tokens)
    case = csm_ref.backbone["mixed"]
    rng = np.random.default_rng(0)
    scrambled = np.where(case.mask, case.tokens, rng.integers(0, csm_ref.config.vocab_size, case.tokens.shape))
    logits, _ = reference_backbone(csm_ref.model, scrambled, case.mask)
    assert max_abs_diff(logits, case.c0_logits) <= 1e-6


def test_reference_rope_scaling_matters(csm_ref: CsmReference) -> None:
    """llama3 RoPE scaling changes the reference by far more than the tolerance (so the port must get it right):
    ~3e-3 with the CSM-1B constants at S <= 16, order 1 with the short-range parameters of the `rope` shape."""
    model = csm_ref.model
    rotaries = [(model.backbone_model.rotary_emb, model.config),
                (model.depth_decoder.model.rotary_emb, model.config.depth_decoder_config)]
    saved = [rot.inv_freq.clone() for rot, _ in rotaries]
    try:
        for rot, cfg in rotaries:
            d, theta = cfg.head_dim, cfg.rope_parameters["rope_theta"]
            rot.inv_freq.copy_(1.0 / theta ** (torch.arange(0, d, 2).float() / d))  # plain RoPE
        case, depth = csm_ref.backbone["mixed"], csm_ref.depth
        d_backbone = max_abs_diff(reference_backbone(model, case.tokens, case.mask)[0], case.c0_logits)
        d_depth = max_abs_diff(reference_depth(model, depth.last_hidden, depth.codes), depth.logits)
    finally:
        for (rot, _), inv in zip(rotaries, saved):
            rot.inv_freq.copy_(inv)
    print(f"[{csm_ref.shape}] plain RoPE instead of llama3: backbone {d_backbone:.2g}, depth {d_depth:.2g}")
    floor = 0.1 if csm_ref.shape == "rope" else 10 * LOGITS_ATOL
    assert d_backbone > floor and d_depth > floor


def test_reference_depth_is_teacher_forced(csm_ref: CsmReference) -> None:
    """Row i-1 of the depth logits depends on codes 0..i-1 only; code K-1 is never read."""
    depth, k = csm_ref.depth, csm_ref.config.num_codebooks
    for j in range(k):
        codes = depth.codes.copy()
        codes[:, j] = (codes[:, j] + 1) % csm_ref.config.vocab_size
        changed = np.abs(reference_depth(csm_ref.model, depth.last_hidden, codes) - depth.logits).max(axis=(0, 2))
        assert (changed[:j] == 0).all(), (j, changed)
        assert (changed[j:] > 1e-3).all(), (j, changed)


def test_saved_checkpoint_stores_tied_audio_embedding_once(csm_ref: CsmReference) -> None:
    """transformers 5.23 writes the tied audio embedding only under the depth decoder's key."""
    assert AUDIO_KEY_DEPTH in csm_ref.saved_keys
    assert AUDIO_KEY_BACKBONE not in csm_ref.saved_keys


# -------------------------------------------------------------------------------------- parity ---
def _backbone_check(ref: CsmReference, port: Port, kind: str, atol: float = LOGITS_ATOL) -> None:
    case = ref.backbone[kind]
    logits, hidden = port.backbone(case.tokens, case.mask)
    b, s, _ = case.tokens.shape
    assert logits.dtype == np.float32 and hidden.dtype == np.float32
    assert logits.shape == (b, s, ref.config.vocab_size) and hidden.shape == (b, s, ref.config.hidden_size)
    d_logits, d_hidden = max_abs_diff(logits, case.c0_logits), max_abs_diff(hidden, case.hidden)
    print(f"[{ref.shape}] backbone {kind} {list(case.tokens.shape)}: c0 logits max|diff| {d_logits:.3g} "
          f"(max |logit| {np.abs(case.c0_logits).max():.2f}), hidden max|diff| {d_hidden:.3g}")
    assert d_logits <= atol
    assert d_hidden <= atol


def _depth_check(ref: CsmReference, port: Port, atol: float = LOGITS_ATOL) -> None:
    depth, k = ref.depth, ref.config.num_codebooks
    logits = port.depth(depth.last_hidden, depth.codes)
    assert logits.dtype == np.float32
    assert logits.shape == (depth.codes.shape[0], k - 1, ref.config.vocab_size)
    diff = max_abs_diff(logits, depth.logits)
    per_row = np.abs(logits - depth.logits).max(axis=(0, 2))
    print(f"[{ref.shape}] depth {list(depth.codes.shape)}: logits max|diff| {diff:.3g} "
          f"(per codebook 1..{k - 1}: {np.array2string(per_row, precision=2)})")
    assert diff <= atol


@pytest.mark.parametrize("kind", BACKBONE_KINDS)
def test_backbone_parity(csm_ref: CsmReference, csm_port: Port, kind: str) -> None:
    """c0 logits and post-norm hidden states at every position, B=2, text/audio/mixed rows and random masks."""
    _backbone_check(csm_ref, csm_port, kind)


def test_depth_parity(csm_ref: CsmReference, csm_port: Port) -> None:
    """Teacher-forced logits of codebooks 1..K-1 from real backbone states, B=4."""
    _depth_check(csm_ref, csm_port)


def test_port_is_deterministic_per_item(csm_ref: CsmReference, csm_port: Port) -> None:
    """Each batch item is computed independently: item 1 alone equals item 1 of the batch."""
    case = csm_ref.backbone["mixed"]
    full, _ = csm_port.backbone(case.tokens, case.mask)
    one, _ = csm_port.backbone(case.tokens[1:], case.mask[1:])
    assert max_abs_diff(one[0], full[1]) <= 1e-5


@pytest.mark.parametrize("variant", AUDIO_KEY_VARIANTS)
def test_tied_audio_embedding_key_variants(variant: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The audio embedding may be stored under the depth decoder's key (transformers 5.23 save_pretrained), under
    the backbone's key, or under both; all load to the same parameters and give identical logits."""
    ref = get_reference("tiny", tmp_path_factory)
    base = get_port("tiny", tmp_path_factory)
    port = get_port("tiny", tmp_path_factory, variant)
    stored = {k for k in saved_keys(variant_dir("tiny", variant, tmp_path_factory)) if "embed_" in k.split(".")[-2]}
    want = {"depth_only": {AUDIO_KEY_DEPTH}, "backbone_only": {AUDIO_KEY_BACKBONE},
            "both": {AUDIO_KEY_DEPTH, AUDIO_KEY_BACKBONE}}[variant]
    assert stored == want | {"embed_text_tokens.weight"}, stored
    case = ref.backbone["mixed"]
    want_logits, want_hidden = base.backbone(case.tokens, case.mask)
    got_logits, got_hidden = port.backbone(case.tokens, case.mask)
    assert np.array_equal(got_logits, want_logits) and np.array_equal(got_hidden, want_hidden)
    depth = ref.depth
    assert np.array_equal(port.depth(depth.last_hidden, depth.codes), base.depth(depth.last_hidden, depth.codes))
    _backbone_check(ref, port, "mixed")
    _depth_check(ref, port)


# ----------------------------------------------------------------------------------- full size ---
@pytest.mark.full_size
@pytest.mark.serial  # ~18 GB: the reference model and the port, one after the other
def test_full_size_parity(tmp_path_factory: pytest.TempPathFactory) -> None:
    """CSM-1B architecture (CsmConfig() defaults, hub llama3 RoPE), random weights, B=1, S=8 mixed rows."""
    ref = get_reference("full", tmp_path_factory)
    assert ref.model is None  # freed before the port loads (RAM)
    assert AUDIO_KEY_DEPTH in ref.saved_keys and AUDIO_KEY_BACKBONE not in ref.saved_keys
    assert 0.5 < float(ref.backbone["mixed"].c0_logits.std()) < 3.0
    assert 0.5 < float(ref.depth.logits.std()) < 3.0
    port = load_port(ref.hf_dir)  # not memoised: 6.6 GB
    try:
        _backbone_check(ref, port, "mixed", atol=FULL_ATOL)
        _depth_check(ref, port, atol=FULL_ATOL)
    finally:
        del port
        release_full_reference()  # 6.6 GB on disk; pytest keeps the last 3 sessions' temp dirs
