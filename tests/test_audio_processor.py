"""Tests for csm_jax.audio: loading, downmix, resampling, raw PCM, loudness, errors."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import soxr

from csm_jax.audio import SAMPLE_RATE, AudioError, decode_pcm, load_audio

DATA = Path(__file__).parent / "data"
STEREO = DATA / "speech_stereo_44k.wav"


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def lufs(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    return pyloudnorm.Meter(rate).integrated_loudness(x.astype(np.float64))


@pytest.mark.parametrize(
    "name, min_s, max_s",
    [("speech_1s", 1.0, 1.5), ("speech_3s", 2.5, 3.5), ("speech_14s", 13.0, 15.0), ("speech_stereo_44k", 1.5, 2.5)],
)
def test_clips_load_as_mono_float32_24k(name: str, min_s: float, max_s: float) -> None:
    path = DATA / f"{name}.wav"
    audio = load_audio(path)
    info = sf.info(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - info.frames * SAMPLE_RATE / info.samplerate) <= 1
    assert min_s <= len(audio) / SAMPLE_RATE <= max_s
    assert 0.05 < np.max(np.abs(audio)) <= 1.0


def test_stereo_44k_is_downmixed_then_resampled() -> None:
    raw, rate = sf.read(STEREO, dtype="float32")
    assert rate == 44_100 and raw.shape[1] == 2
    assert not np.allclose(raw[:, 0], raw[:, 1])  # the channels really differ
    expected = soxr.resample(raw.mean(axis=1), rate, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(load_audio(STEREO), expected, atol=1e-6)


def test_custom_output_rate() -> None:
    audio = load_audio(DATA / "speech_1s.wav", sample_rate=16_000)
    assert abs(len(audio) - sf.info(DATA / "speech_1s.wav").frames * 2 / 3) <= 1


def test_bytes_and_file_objects_match_path() -> None:
    expected = load_audio(STEREO)
    data = STEREO.read_bytes()
    with open(STEREO, "rb") as f:
        from_file = load_audio(f)
    sources = (str(STEREO), data, bytearray(data), memoryview(data), io.BytesIO(data))
    for audio in (*map(load_audio, sources), from_file):
        np.testing.assert_array_equal(audio, expected)


def test_decode_pcm_matches_load_audio_of_same_samples() -> None:
    raw, rate = sf.read(STEREO, dtype="int16")
    decoded = decode_pcm(raw.astype("<i2").tobytes(), sample_rate=rate, channels=2)
    np.testing.assert_allclose(decoded, load_audio(STEREO), atol=1e-6)


def test_pcm16_round_trip() -> None:
    ints = np.array([0, 1, -1, 16384, -16384, 32767, -32768, 1234], dtype="<i2")
    np.testing.assert_array_equal(decode_pcm(ints.tobytes(), sample_rate=SAMPLE_RATE), ints / np.float32(32768))
    stereo = np.array([[1000, 3000], [-32768, 32767], [8, -8]], dtype="<i2")
    decoded = decode_pcm(stereo.tobytes(), sample_rate=SAMPLE_RATE, channels=2)
    np.testing.assert_allclose(decoded, stereo.mean(axis=1) / 32768, atol=1e-7)


def test_float32_round_trip() -> None:
    samples = np.random.default_rng(0).uniform(-1, 1, 500).astype("<f4")
    decoded = decode_pcm(samples.tobytes(), sample_rate=SAMPLE_RATE, encoding="float32")
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, samples)


@pytest.mark.parametrize("via", ["wav", "pcm"])
def test_resampling_keeps_sine_frequency_and_amplitude(via: str) -> None:
    tone = sine(440.0, 16_000, 1.0)
    if via == "wav":
        audio = load_audio(wav_bytes(tone, 16_000, "FLOAT"))
    else:
        audio = decode_pcm(tone.tobytes(), sample_rate=16_000, encoding="float32")
    assert len(audio) == SAMPLE_RATE
    assert peak_hz(audio, SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert np.max(np.abs(audio[1000:-1000])) == pytest.approx(0.5, abs=0.01)


def test_downsampling_removes_content_above_nyquist() -> None:
    tone = sine(440.0, 48_000, 1.0) + sine(15_000.0, 48_000, 1.0)  # 15 kHz would alias to 9 kHz
    audio = load_audio(wav_bytes(tone, 48_000, "FLOAT"))
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)
    assert peak_hz(audio, SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert spectrum[np.abs(freqs - 9_000) < 50].max() < 1e-3 * spectrum.max()


@pytest.mark.parametrize(
    "name, target", [("speech_1s", -18.0), ("speech_3s", -23.0), ("speech_14s", -27.0), ("speech_stereo_44k", -30.0)]
)
def test_loudness_normalisation_hits_target(name: str, target: float) -> None:
    audio = load_audio(DATA / f"{name}.wav", normalize_lufs=target)
    assert lufs(audio) == pytest.approx(target, abs=0.5)
    assert np.max(np.abs(audio)) <= 1.0


def test_loudness_normalisation_peak_limits() -> None:
    audio = load_audio(DATA / "speech_3s.wav", normalize_lufs=0.0)
    assert np.max(np.abs(audio)) == 1.0
    assert lufs(audio) < -1.0


def test_loudness_normalisation_of_clip_shorter_than_block() -> None:
    short = load_audio(wav_bytes(sine(1000.0, SAMPLE_RATE, 0.2, 0.1), SAMPLE_RATE, "FLOAT"), normalize_lufs=-20.0)
    long = load_audio(wav_bytes(sine(1000.0, SAMPLE_RATE, 2.0, 0.1), SAMPLE_RATE, "FLOAT"), normalize_lufs=-20.0)
    assert lufs(long) == pytest.approx(-20.0, abs=0.5)
    rms_db = [20 * np.log10(np.sqrt(np.mean(x**2))) for x in (short, long)]
    assert rms_db[0] == pytest.approx(rms_db[1], abs=0.5)


def test_loudness_normalisation_leaves_silence_unchanged() -> None:
    silence = np.zeros(SAMPLE_RATE, dtype="<i2").tobytes()
    np.testing.assert_array_equal(decode_pcm(silence, sample_rate=SAMPLE_RATE, normalize_lufs=-20.0), 0.0)


def test_max_seconds_none_disables_limit() -> None:
    assert len(load_audio(DATA / "speech_3s.wav", max_seconds=None)) > 2 * SAMPLE_RATE


def _nan_wav() -> bytes:
    samples = sine(440.0, SAMPLE_RATE, 0.1)
    samples[10] = np.nan
    return wav_bytes(samples, SAMPLE_RATE, "FLOAT")


pcm = partial(decode_pcm, sample_rate=SAMPLE_RATE)
BAD_INPUTS = {
    "missing file": (lambda: load_audio(DATA / "missing.wav"), "audio file not found: .*missing.wav"),
    "garbage bytes": (lambda: load_audio(b"definitely not audio" * 10), "cannot decode audio from 200 bytes"),
    "no bytes": (lambda: load_audio(b""), "cannot decode audio from 0 bytes"),
    "bad file object": (lambda: load_audio(io.BytesIO(b"RIFF\x00\x00")), "cannot decode audio from file object"),
    "bad source type": (lambda: load_audio(12345), "unsupported audio source type: int"),
    "empty wav": (lambda: load_audio(wav_bytes(np.zeros(0, np.float32), SAMPLE_RATE)), r"empty \(0 samples\)"),
    "nan wav": (lambda: load_audio(_nan_wav()), r"non-finite samples \(NaN or inf\)"),
    "long wav": (lambda: load_audio(DATA / "speech_3s.wav", max_seconds=2), r"3\.20 s long, over the 2 s limit"),
    "zero out rate": (lambda: load_audio(STEREO, sample_rate=0), "sample_rate must be a positive integer, got 0"),
    "empty pcm": (lambda: pcm(b""), r"empty \(0 samples\)"),
    "odd pcm16": (lambda: pcm(bytes(3)), "3 bytes, not a multiple of the 2-byte frame"),
    "odd stereo": (lambda: pcm(bytes(6), channels=2), r"4-byte frame \(2 channel\(s\) of pcm16\)"),
    "odd float32": (lambda: pcm(bytes(6), encoding="float32"), "6 bytes, not a multiple of the 4-byte frame"),
    "negative rate": (lambda: pcm(bytes(4), sample_rate=-16000), "sample_rate must be a positive integer, got -16000"),
    "float rate": (lambda: pcm(bytes(4), sample_rate=24000.0), "sample_rate must be a positive integer"),
    "zero channels": (lambda: pcm(bytes(4), channels=0), "channels must be a positive integer, got 0"),
    "zero target": (lambda: pcm(bytes(4), target_rate=0), "target_rate must be a positive integer"),
    "bad encoding": (lambda: pcm(bytes(4), encoding="mulaw"), "unknown PCM encoding 'mulaw'"),
    "inf pcm": (lambda: pcm(np.array([0, np.inf], "<f4").tobytes(), encoding="float32"), "non-finite"),
    "long pcm": (lambda: pcm(bytes(320_000), sample_rate=16_000, max_seconds=5), r"10\.00 s long, over the 5 s limit"),
}


@pytest.mark.parametrize("call, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_audio_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(AudioError, match=match):
        call()


def test_corrupt_file_on_disk(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(AudioError, match="cannot decode audio from '.*corrupt.wav'"):
        load_audio(bad)


def test_audio_error_is_value_error() -> None:
    assert issubclass(AudioError, ValueError)


def test_many_channels_at_high_rates_decode_in_bounded_memory(tmp_path):
    """Highly compressible audio (8-channel 384 kHz FLAC silence) decodes block by block: memory follows the mono
    signal, not the 8 x 4 bytes per sample a whole-file decode would take."""
    import tracemalloc

    path = tmp_path / "wide.flac"
    rate, seconds, channels = 384_000, 20, 8
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(np.zeros((rate, channels), np.int16))
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    audio = load_audio(path, max_seconds=60)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert audio.shape == (seconds * 24_000,) and not audio.any()
    whole = seconds * rate * channels * 4
    assert peak < whole / 4, (peak, whole)
