"""Signal-level metrics with known answers: mel distance and SI-SNR on speech plus scaled copies and noise, Praat F0
on tones, vibrato harmonics and pitch-shifted speech, and speaker features on espeak-ng voices."""

from __future__ import annotations

import itertools
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soxr
from scipy.signal import sawtooth

import csm_jax
from csm_jax.evaluation import (closer_to_prompt, f0_error, f0_track, feature_scale, mel_distance, si_snr,
                                speaker_distance, speaker_features)

SR = csm_jax.SAMPLE_RATE
DATA = Path(__file__).parent / "data"
SENTENCES = ["the quick brown fox jumps over the lazy dog", "please bring the green cup to the kitchen",
             "what a nice day it is today", "she sells sea shells by the sea shore"]
VOICES = {"low": ["-v", "en-us", "-p", "20"], "mid": ["-v", "en-us", "-p", "50"],
          "high": ["-v", "en-us+f3", "-p", "80"]}


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return csm_jax.load_audio(DATA / "speech_3s.wav")


@pytest.fixture(scope="module")
def espeak(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str], str], np.ndarray]:
    """`say(espeak-ng voice args, text) -> float32 [N]` at 24 kHz, cached per module."""
    root, cache = tmp_path_factory.mktemp("espeak"), {}

    def say(args: list[str], text: str) -> np.ndarray:
        key = (*args, text)
        if key not in cache:
            path = root / f"{len(cache)}.wav"
            subprocess.run(["espeak-ng", *args, "-w", str(path), text], check=True)
            cache[key] = csm_jax.load_audio(path)
        return cache[key]

    return say


def _noisy(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=x.size)
    clean = x - x.mean()
    noise *= np.sqrt((clean @ clean) / (noise @ noise) / 10 ** (snr_db / 10))
    return (x + noise).astype(np.float32)


def _harmonic(f0: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """Ten harmonics (1/k amplitudes) following the per-sample F0 contour f0 [N] in Hz, multiplied by gate [N]."""
    phase = 2 * np.pi * np.cumsum(f0) / SR
    return (gate * sum(np.sin(k * phase) / k for k in range(1, 11)) * 0.3).astype(np.float32)


def test_mel_distance(speech: np.ndarray) -> None:
    assert mel_distance(speech, speech) == 0.0
    assert mel_distance(speech[:-1000], speech) == 0.0  # compared over the shorter length
    d30, d10 = mel_distance(speech, _noisy(speech, 30)), mel_distance(speech, _noisy(speech, 10))
    assert 0.0 < d30 < d10, (d30, d10)
    noise = np.random.default_rng(1).normal(0, 0.1, SR)
    # White noise is far above the 1e-5 clamp in every band: halving it shifts each log10 mel by log10(2), per scale.
    assert mel_distance(noise, 0.5 * noise) == pytest.approx(7 * math.log10(2), abs=1e-2)
    with pytest.raises(ValueError, match="mono"):
        mel_distance(speech[None], speech)


def test_si_snr(speech: np.ndarray) -> None:
    assert si_snr(speech, 0.5 * speech) > 100.0  # scale invariant: exactly +inf here
    for snr in (20.0, 10.0, 0.0):
        assert si_snr(speech, _noisy(speech, snr)) == pytest.approx(snr, abs=0.3)
    assert si_snr(speech, -speech) > 100.0
    with pytest.raises(ValueError, match="silent"):
        si_snr(np.zeros(100), speech)


@pytest.mark.parametrize("freq, wave", [(110.0, "sawtooth"), (220.0, "sine"), (347.0, "sawtooth")])
def test_f0_track_tone(freq: float, wave: str) -> None:
    t = np.arange(SR) / SR
    x = 0.5 * (sawtooth(2 * np.pi * freq * t) if wave == "sawtooth" else np.sin(2 * np.pi * freq * t))
    f0, voiced = f0_track(x.astype(np.float32))
    assert f0.shape == voiced.shape and voiced.mean() > 0.9
    assert np.median(f0[voiced]) == pytest.approx(freq, rel=0.01)
    assert f0_track(x[:1000])[0].size == 0  # shorter than Praat's 50 ms window


def test_f0_error_known_shift() -> None:
    t = np.arange(int(1.4 * SR)) / SR
    contour = 120.0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    gate = ((t > 0.1) & (t < 0.6) | (t > 0.8) & (t < 1.3)).astype(float)
    ref = _harmonic(contour, gate)
    same = f0_error(ref, ref)
    assert same["median_rel_error"] == 0.0 and same["voicing_agreement"] == 1.0 and same["voiced_frames"] > 80
    assert same["ref_f0_hz"] == pytest.approx(np.median(contour[gate > 0]), rel=0.01)
    up10 = f0_error(ref, _harmonic(1.1 * contour, gate))
    assert up10["median_rel_error"] == pytest.approx(0.1, abs=0.005)
    assert up10["gross_error_rate"] == 0.0 and up10["voicing_agreement"] > 0.95
    down30 = f0_error(ref, _harmonic(0.7 * contour, gate))
    assert down30["median_rel_error"] == pytest.approx(0.3, abs=0.01) and down30["gross_error_rate"] > 0.95
    silent = f0_error(ref, np.zeros_like(ref))
    assert math.isnan(silent["median_rel_error"]) and math.isnan(silent["gross_error_rate"])
    assert silent["voiced_frames"] == 0 and 0.0 < silent["voicing_agreement"] < 0.5
    assert silent["ref_f0_hz"] == same["ref_f0_hz"] and math.isnan(f0_error(np.zeros_like(ref), ref)["ref_f0_hz"])


def test_f0_of_pitch_shifted_speech(speech: np.ndarray, espeak: Callable[[list[str], str], np.ndarray]) -> None:
    f0, voiced = f0_track(speech)
    assert voiced.mean() > 0.4
    for factor in (1.25, 0.8):  # resample and play back at 24 kHz: every frequency scales by `factor`
        g0, g_voiced = f0_track(soxr.resample(speech, SR, round(SR / factor)))
        assert np.median(g0[g_voiced]) / np.median(f0[voiced]) == pytest.approx(factor, rel=0.02)

    # espeak-ng -p raises the pitch of the same utterance with (nearly) the same timing: the frame-wise error
    # grows with the shift and matches the ratio of median F0s.
    clips = {p: espeak(["-v", "en-us", "-p", str(p)], SENTENCES[0]) for p in (40, 60, 80)}
    medians = {p: np.median(f[v]) for p, (f, v) in ((p, f0_track(c)) for p, c in clips.items())}
    errors = {p: f0_error(clips[40], clips[p]) for p in clips}
    assert errors[40]["median_rel_error"] == 0.0
    assert 0.1 < errors[60]["median_rel_error"] < errors[80]["median_rel_error"]
    for p in (60, 80):
        assert errors[p]["median_rel_error"] == pytest.approx(medians[p] / medians[40] - 1, abs=0.03)
        assert errors[p]["voicing_agreement"] > 0.9


def test_speaker_features_invariances(speech: np.ndarray) -> None:
    feats = speaker_features(speech)
    assert feats.shape == (22,) and feats.dtype == np.float64 and np.isfinite(feats).all()
    np.testing.assert_allclose(speaker_features(0.3 * speech), feats, atol=1e-4)  # loudness only moves c0 (dropped)
    assert speaker_distance(feats, feats) == 0.0
    silent = speaker_features(np.zeros(SR, np.float32))
    assert np.isnan(silent[:2]).all() and math.isnan(speaker_distance(feats, silent))
    assert not closer_to_prompt(np.zeros(SR, np.float32), speech, speech)
    with pytest.raises(ValueError, match="shape"):
        speaker_distance(feats, feats[:-1])


@pytest.mark.parametrize("voice_a, voice_b", [("low", "high"), ("low", "mid"), ("mid", "high")])
def test_outputs_closer_to_own_voice(espeak: Callable[[list[str], str], np.ndarray], voice_a: str,
                                     voice_b: str) -> None:
    """Prompts (sentences 0-1) and outputs (2-3) differ in text; each output must be nearer its own voice's prompts."""
    clips = {v: [espeak(args, s) for s in SENTENCES] for v, args in VOICES.items()}
    for own, other in ((voice_a, voice_b), (voice_b, voice_a)):
        for output in clips[own][2:]:
            for prompt_own, prompt_other in itertools.product(clips[own][:2], clips[other][:2]):
                assert closer_to_prompt(output, prompt_own, prompt_other)

    feats = {v: [speaker_features(c) for c in cs] for v, cs in clips.items()}
    scale = feature_scale([fs[:2] for fs in feats.values()])  # within-voice spread of the prompts of every voice
    assert scale.shape == (22,) and (scale > 0).all()
    for own, other in ((voice_a, voice_b), (voice_b, voice_a)):
        for out in feats[own][2:]:
            assert (max(speaker_distance(out, f, scale) for f in feats[own][:2])
                    < min(speaker_distance(out, f, scale) for f in feats[other][:2]))
