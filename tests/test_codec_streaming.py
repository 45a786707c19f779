"""Streaming Mimi: frame-by-frame encoding/decoding equals the offline path, for one and several streams,
past the attention window; reset() and reset(mask) restart streams."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from mimi_fixtures import (  # noqa: F401  (fixtures)
    FRAME,
    MimiReference,
    clip,
    frac_equal,
    full_codec,
    max_abs_diff,
    three_signals,
    tiny_codec,
    tiny_ref,
    trim_to_frames,
)

import csm_jax
from csm_jax.codec import StreamDecoder, StreamEncoder

STREAM_ATOL = 1e-5  # streamed vs offline decode, absolute


def stream_encode(codec: csm_jax.MimiCodec, audio: np.ndarray) -> np.ndarray:
    """float32 [B, T * 1920] -> codes [B, K, T], one `step` per frame."""
    b, n = audio.shape
    assert n % FRAME == 0
    enc = codec.stream_encoder(b)
    out = [enc.step(audio[:, t * FRAME : (t + 1) * FRAME]) for t in range(n // FRAME)]
    return np.asarray(jax.numpy.stack(out, axis=-1))


def stream_decode(codec: csm_jax.MimiCodec, codes: np.ndarray) -> np.ndarray:
    """codes [B, K, T] -> float32 [B, T * 1920], one `step` per frame."""
    dec = codec.stream_decoder(codes.shape[0])
    out = [dec.step(codes[:, :, t]) for t in range(codes.shape[-1])]
    return np.asarray(jax.numpy.concatenate(out, axis=-1))


def _check_stream_encode(codec: csm_jax.MimiCodec, audio: np.ndarray, label: str) -> np.ndarray:
    offline = np.asarray(codec.encode(audio))
    streamed = stream_encode(codec, audio)
    assert streamed.dtype == np.int32 and streamed.shape == offline.shape
    match = frac_equal(streamed, offline)
    print(f"{label}: streamed codes equal offline {100 * match:.4f} % over {list(offline.shape)}")
    first = np.argwhere(streamed != offline)[:5].tolist()
    assert match == 1.0, f"{100 * match:.4f} % equal; first differences (b, k, t) at {first}"
    return offline


def _check_stream_decode(codec: csm_jax.MimiCodec, codes: np.ndarray, label: str) -> np.ndarray:
    offline = np.asarray(codec.decode(codes))
    streamed = stream_decode(codec, codes)
    assert streamed.dtype == np.float32 and streamed.shape == offline.shape
    diff = max_abs_diff(streamed, offline)
    print(f"{label}: streamed audio vs offline max |diff| {diff:.3g} over {list(codes.shape)}")
    assert diff <= STREAM_ATOL
    return streamed


# ------------------------------------------------------------------------------- tiny: long streams ---
# The tiny attention window is 6 encoder steps (3 frames), so 181 frames run far past it.
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_stream_encode_equals_offline(tiny_ref: MimiReference, tiny_codec: csm_jax.MimiCodec, batch: int) -> None:
    audio = trim_to_frames(three_signals(len(clip("speech_14s")))[:batch])
    assert audio.shape == (batch, 181 * FRAME)
    offline = _check_stream_encode(tiny_codec, audio, f"[tiny] B={batch}")
    assert frac_equal(offline, tiny_ref.encode(audio)) >= 0.999  # and offline is transformers'


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_stream_decode_equals_offline(tiny_ref: MimiReference, tiny_codec: csm_jax.MimiCodec, batch: int) -> None:
    audio = trim_to_frames(three_signals(len(clip("speech_14s")))[:batch])
    codes = tiny_ref.encode(audio)
    streamed = _check_stream_decode(tiny_codec, codes, f"[tiny] B={batch}")
    assert max_abs_diff(streamed, tiny_ref.decode(codes)) <= 1e-4  # and equals transformers' decode


# ------------------------------------------------------------------------------------- full size ---
@pytest.mark.full_size
def test_full_stream_encode_long_single(full_codec: csm_jax.MimiCodec) -> None:
    """The 14 s clip trimmed to 181 frames = 362 encoder steps: past the 250-step attention window."""
    audio = trim_to_frames(clip("speech_14s"))[None]
    assert audio.shape == (1, 181 * FRAME)
    _check_stream_encode(full_codec, audio, "[full] B=1 14.5 s")


@pytest.mark.full_size
def test_full_stream_encode_batch_of_three(full_codec: csm_jax.MimiCodec) -> None:
    """Three different 14.5 s signals streamed together, past the attention window."""
    audio = trim_to_frames(three_signals(len(clip("speech_14s"))))
    assert audio.shape == (3, 181 * FRAME)
    offline = _check_stream_encode(full_codec, audio, "[full] B=3 14.5 s")
    assert frac_equal(offline[0], offline[1]) < 0.5 and frac_equal(offline[1], offline[2]) < 0.5


@pytest.mark.full_size
@pytest.mark.parametrize("batch", [1, 3])
def test_full_stream_decode_equals_offline(full_codec: csm_jax.MimiCodec, batch: int) -> None:
    codes = np.asarray(full_codec.encode(three_signals(40 * FRAME)[:batch]))
    _check_stream_decode(full_codec, codes, f"[full] B={batch} 40 frames")


# -------------------------------------------------------------------------------------------- reset ---
def _frames(audio: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
    return [audio[:, t * FRAME : (t + 1) * FRAME] for t in range(start, stop)]


@pytest.fixture(scope="module")
def signals() -> np.ndarray:
    return three_signals(20 * FRAME)


def _run_encoder(enc: StreamEncoder, audio: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.stack([np.asarray(enc.step(c)) for c in _frames(audio, start, stop)], -1)


def _run_decoder(dec: StreamDecoder, codes: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.concatenate([np.asarray(dec.step(codes[:, :, t])) for t in range(start, stop)], -1)


# Each test drives ONE stream object (a new stream object compiles its step function again):
#   fresh  = frames 10..19 on the new stream
#   cont   = frames 0..19 without reset, last 10 kept       (history matters: cont != fresh)
#   got    = frames 0..9, reset(...), frames 10..19
def test_encoder_reset_restarts_all_streams(tiny_codec: csm_jax.MimiCodec, signals: np.ndarray) -> None:
    x = signals[:2]
    enc = tiny_codec.stream_encoder(2)
    fresh = _run_encoder(enc, x, 10, 20)
    _run_encoder(enc, x, 0, 10)
    enc.reset()
    got = _run_encoder(enc, x, 10, 20)
    np.testing.assert_array_equal(got, fresh)
    # and both are the offline codes of those frames alone
    np.testing.assert_array_equal(got, np.asarray(tiny_codec.encode(x[:, 10 * FRAME :])))


def test_decoder_reset_restarts_all_streams(
    tiny_ref: MimiReference, tiny_codec: csm_jax.MimiCodec, signals: np.ndarray
) -> None:
    codes = tiny_ref.encode(signals[:2])
    dec = tiny_codec.stream_decoder(2)
    fresh = _run_decoder(dec, codes, 10, 20)
    _run_decoder(dec, codes, 0, 10)
    dec.reset()
    got = _run_decoder(dec, codes, 10, 20)
    np.testing.assert_allclose(got, fresh, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, tiny_ref.decode(codes[:, :, 10:]), rtol=0, atol=1e-4)


def test_encoder_reset_mask_restarts_only_masked_streams(tiny_codec: csm_jax.MimiCodec, signals: np.ndarray) -> None:
    mask = np.array([True, False, True])
    enc = tiny_codec.stream_encoder(3)
    fresh = _run_encoder(enc, signals, 10, 20)
    enc.reset()
    _run_encoder(enc, signals, 0, 10)
    cont = _run_encoder(enc, signals, 10, 20)
    enc.reset()
    _run_encoder(enc, signals, 0, 10)
    enc.reset(mask)
    got = _run_encoder(enc, signals, 10, 20)
    assert not np.array_equal(cont[mask], fresh[mask])  # the history matters, so the test can fail
    np.testing.assert_array_equal(got[mask], fresh[mask])
    np.testing.assert_array_equal(got[~mask], cont[~mask])


def test_decoder_reset_mask_restarts_only_masked_streams(
    tiny_ref: MimiReference, tiny_codec: csm_jax.MimiCodec, signals: np.ndarray
) -> None:
    codes = tiny_ref.encode(signals)
    mask = [False, True, False]
    m = np.array(mask)
    dec = tiny_codec.stream_decoder(3)
    fresh = _run_decoder(dec, codes, 10, 20)
    dec.reset()
    _run_decoder(dec, codes, 0, 10)
    cont = _run_decoder(dec, codes, 10, 20)
    dec.reset()
    _run_decoder(dec, codes, 0, 10)
    dec.reset(mask)
    got = _run_decoder(dec, codes, 10, 20)
    assert max_abs_diff(cont[m], fresh[m]) > 1e-3  # the history matters
    np.testing.assert_allclose(got[m], fresh[m], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[~m], cont[~m], rtol=0, atol=1e-6)


def test_reset_mask_with_wrong_shape_is_rejected(tiny_codec: csm_jax.MimiCodec) -> None:
    enc = tiny_codec.stream_encoder(3)
    with pytest.raises(ValueError, match=r"mask must have shape \(3,\)"):
        enc.reset([True, False])


def test_bucketed_encode_equals_the_streaming_encoder_and_compiles_per_bucket(tiny_codec: csm_jax.MimiCodec) -> None:
    """`encode_bucketed`: codes of the audio zero-padded to whole frames (the streaming encoder's), for lengths
    that are and are not whole frames, with one compilation per length bucket, not per length."""
    from csm_jax.codec import codec as codec_module

    rng = np.random.default_rng(3)
    encode_fn = codec_module._offline_fns(tiny_codec.config)[0]
    for n in (3 * FRAME, 3 * FRAME + 5, 5 * FRAME - 7, 1000, 7 * FRAME + 961):
        audio = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        whole = np.pad(audio, ((0, 0), (0, -n % FRAME)))
        want = stream_encode(tiny_codec, whole)
        np.testing.assert_array_equal(want, np.asarray(tiny_codec.encode(whole)))
        compiled_before = encode_fn._cache_size()
        np.testing.assert_array_equal(np.asarray(tiny_codec.encode_bucketed(audio)), want)
        new = encode_fn._cache_size() - compiled_before
        assert new == (n == 3 * FRAME)  # 1..8 frames share the 8-frame bucket: only the first call compiles


def test_resynthesis_on_length_buckets_equals_decoding_the_codes(tiny_codec: csm_jax.MimiCodec) -> None:
    """`resynthesize`: decode(encode_bucketed(audio)) cut to the input's length (the silence appended for the
    bucket changes none of it: both halves are causal), compiled once per bucket."""
    from csm_jax.codec import codec as codec_module

    rng = np.random.default_rng(4)
    decode_fn = codec_module._offline_fns(tiny_codec.config)[1]
    for n in (9 * FRAME + 11, 12 * FRAME - 5, 16 * FRAME):
        audio = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        want = np.asarray(tiny_codec.decode(tiny_codec.encode_bucketed(audio)))[:, :n]
        compiled_before = decode_fn._cache_size()
        got = np.asarray(tiny_codec.resynthesize(audio))
        assert got.shape == (2, n) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert decode_fn._cache_size() - compiled_before == (n == 9 * FRAME + 11)  # 9..16 frames: one bucket
