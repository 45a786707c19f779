"""Offline parity of csm_jax's Mimi against transformers' MimiModel (seeded random weights), loaded from a
transformers directory and from a moshi-format file, at TINY and FULL (official) size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mimi_fixtures import (  # noqa: F401  (fixtures)
    FRAME,
    MimiReference,
    clip,
    codec,
    convtr_indices,
    frac_equal,
    get_codec,
    get_reference,
    hf_to_moshi,
    max_abs_diff,
    ref,
    size,
)
from safetensors.torch import load_file, save_file

import csm_jax

CODE_MATCH = 0.999  # codes equal to transformers' (near-ties in the nearest-centroid search may flip)
AUDIO_ATOL = 1e-4  # decoded audio, absolute, for audio peaking at ~0.8


def _encode_check(
    ref: MimiReference, codec: csm_jax.MimiCodec, audio: np.ndarray, num_quantizers: int | None = None
) -> np.ndarray:
    want = ref.encode(audio, num_quantizers)
    got = np.asarray(codec.encode(audio))
    k = num_quantizers or ref.config.num_quantizers
    assert got.dtype == np.int32
    assert got.shape == want.shape == (audio.shape[0], k, math.ceil(audio.shape[-1] / FRAME))
    match = frac_equal(got, want)
    print(f"[{ref.size}] encode {list(audio.shape)} K={k}: codes equal {100 * match:.4f} %")
    assert match >= CODE_MATCH, f"only {100 * match:.3f} % of codes equal transformers'"
    return want


def _decode_check(ref: MimiReference, codec: csm_jax.MimiCodec, codes: np.ndarray) -> None:
    want = ref.decode(codes)
    got = np.asarray(codec.decode(codes))
    assert got.dtype == np.float32
    assert got.shape == want.shape == (codes.shape[0], FRAME * codes.shape[-1])
    diff = max_abs_diff(got, want)
    print(f"[{ref.size}] decode {list(codes.shape)}: max |diff| {diff:.3g} (peak {np.abs(want).max():.3f})")
    assert diff <= AUDIO_ATOL


def test_reference_is_not_degenerate(ref: MimiReference) -> None:
    """The random reference behaves like a codec: speech uses many codes and decodes at a speech-like level."""
    x = clip("speech_14s")[None]
    codes = ref.encode(x)
    bins = ref.config.codebook_size
    distinct = [len(np.unique(codes[0, k])) for k in range(codes.shape[1])]
    assert min(distinct) >= min(bins // 2, 40), distinct
    peak = np.abs(ref.decode(codes)).max()
    assert 0.4 <= peak <= 1.5, peak


@pytest.mark.parametrize("clip_name", ["speech_1s", "speech_14s"])
@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_encode_decode_match_transformers(
    ref: MimiReference, size: str, fmt: str, clip_name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """speech_1s: 26912 samples (not a multiple of 1920); speech_14s: 181.05 frames, past the attention window."""
    codec = get_codec(size, fmt, tmp_path_factory)
    assert codec.num_codebooks == ref.config.num_quantizers
    assert (codec.sample_rate, codec.frame_size) == (24_000, FRAME)
    x = clip(clip_name)[None]
    assert x.shape[-1] % FRAME != 0
    codes = _encode_check(ref, codec, x)
    _decode_check(ref, codec, codes)


@pytest.mark.parametrize(
    "size, num_samples",
    [("tiny", 1), ("tiny", 1921), ("tiny", 7 * FRAME + 1234)],
    indirect=["size"],
)
def test_lengths(ref: MimiReference, codec: csm_jax.MimiCodec, num_samples: int) -> None:
    """Any length N gives ceil(N / 1920) frames, padded like transformers (zeros; replicate at the downsample).
    Full size: speech_1s and speech_14s above are not multiples of 1920 either; whole frames: test_codec_streaming."""
    x = clip("speech_3s")[None, 5000 : 5000 + num_samples]
    codes = _encode_check(ref, codec, x)
    _decode_check(ref, codec, codes)


def test_batch_of_two(ref: MimiReference, codec: csm_jax.MimiCodec) -> None:
    """Two different clips of equal length in one batch (transformers encodes rows independently)."""
    a = clip("speech_1s")
    b = 0.5 * clip("speech_3s")[20_000 : 20_000 + len(a)]
    x = np.stack([a, b]).astype(np.float32)
    codes = _encode_check(ref, codec, x)
    assert frac_equal(codes[0], codes[1]) < 0.5  # the rows really differ
    _decode_check(ref, codec, codes)


def test_one_dimensional_audio_is_one_stream(ref: MimiReference, codec: csm_jax.MimiCodec) -> None:
    x = clip("speech_1s")
    np.testing.assert_array_equal(np.asarray(codec.encode(x)), np.asarray(codec.encode(x[None])))


@pytest.mark.parametrize(
    "size, fmt, num_codebooks",
    [("tiny", "hf", 1), ("tiny", "moshi", 2), pytest.param("full", "moshi", 8, marks=pytest.mark.full_size)],
    indirect=["size"],
)
def test_num_codebooks_truncation(ref: MimiReference, fmt: str, num_codebooks: int) -> None:
    """load_codec(..., num_codebooks=n) encodes like transformers' encode(num_quantizers=n); decode takes K=n."""
    path = ref.hf_dir if fmt == "hf" else ref.moshi_file
    config = ref.config.to_dict() if fmt == "moshi" and ref.size == "tiny" else None
    codec = csm_jax.load_codec(path, num_codebooks=num_codebooks, config=config)
    assert codec.num_codebooks == num_codebooks
    codes = _encode_check(ref, codec, clip("speech_1s")[None], num_quantizers=num_codebooks)
    _decode_check(ref, codec, codes)


@pytest.fixture(scope="module")
def tiny_config_variants(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = get_codec("tiny", "hf", tmp_path_factory).config  # read by load_codec from the HF config.json
    return {"MimiConfig": cfg, "to_dict": cfg.to_dict()}


@pytest.mark.parametrize("as_type", ["MimiConfig", "to_dict"])
def test_moshi_file_with_explicit_config(
    tiny_config_variants: dict, as_type: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The moshi file of a non-default architecture loads with `config=` a csm_jax MimiConfig or its dict."""
    ref = get_reference("tiny", tmp_path_factory)
    codec = csm_jax.load_codec(ref.moshi_file, config=tiny_config_variants[as_type])
    x = clip("speech_1s")[None]
    codes = _encode_check(ref, codec, x)
    _decode_check(ref, codec, codes)


def test_moshi_rope_order_matters(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Negative control: a moshi file whose q/k rows were NOT permuted back to interleaved RoPE order must
    not match, so the moshi parity above really checks the RoPE permutation (and the fixtures' attention)."""
    ref = get_reference("tiny", tmp_path_factory)
    tensors = load_file(str(ref.hf_dir / "model.safetensors"))
    good = hf_to_moshi(tensors, ref.config, convtr_indices(ref.model))
    bad = dict(good)
    for part in ("encoder_transformer", "decoder_transformer"):
        key = f"{part}.transformer.layers.0.self_attn.in_proj_weight"
        hf = f"{part}.layers.0.self_attn"
        bad[key] = torch.cat([tensors[f"{hf}.{p}_proj.weight"] for p in "qkv"])
        assert not torch.equal(bad[key], good[key])
    path = tmp_path / "unpermuted.safetensors"
    save_file(bad, str(path))
    codec = csm_jax.load_codec(path, config=ref.config.to_dict())
    x = clip("speech_3s")[None]
    codes = ref.encode(x)
    match = frac_equal(np.asarray(codec.encode(x)), codes)
    diff = max_abs_diff(np.asarray(codec.decode(codes)), ref.decode(codes))
    assert match < 0.97 and diff > 1e-2, (match, diff)
