"""Text-independent speaker features for voice-prompting evaluation: does a generated utterance sound like the voice
of its prompt? Two cues that synthetic voices differ in and that do not depend on what is said:

* pitch: robust mean (median) and standard deviation of F0 over voiced frames, in semitones (register and
  liveliness);
* timbre: the long-term spectral envelope, as cepstral coefficients c1..c20 of the mean log-mel spectrum of the
  speech-active frames. Averaging over a whole utterance washes out the phonetic content; dropping c0 removes
  loudness (a gain shifts every log-mel band equally, which the orthonormal DCT puts in c0 alone); keeping only
  low quefrencies keeps the formant/vocal-tract shape and smooths away the harmonic ripple of the pitch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.fft import dct

from csm_jax.audio.processor import SAMPLE_RATE
from csm_jax.evaluation.pitch import f0_track
from csm_jax.evaluation.signal import mel_filterbank, stft_magnitude

N_PITCH = 2  # median, robust std of F0 in semitones re 100 Hz
N_CEPSTRA = 20  # c1..c20
WINDOW_S, HOP_S = 0.025, 0.010  # envelope analysis frames
N_MELS, FMIN, FMAX = 40, 50.0, 8000.0
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation for a normal distribution
ACTIVE_DB = 40.0  # envelope frames within this many dB of the loudest one count as speech
# Default divisors, about the variation between 3 s sentences of one espeak-ng voice: 1 semitone for the F0 median
# and spread, and per cepstrum 4 dB x sqrt(N_MELS / N_CEPSTRA), so that the timbre part is 1 at a 4 dB RMS
# difference between the log-mel envelopes.
SEMITONE_SCALE = (1.0, 1.0)
CEPSTRUM_SCALE = 4.0 * np.sqrt(N_MELS / N_CEPSTRA)
DEFAULT_SCALE = np.array([*SEMITONE_SCALE, *[CEPSTRUM_SCALE] * N_CEPSTRA])


def speaker_features(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speaker features of float mono speech [N]: float64 [22] = [median and robust standard deviation (1.4826 x
    median absolute deviation, insensitive to octave errors) of F0 in semitones re 100 Hz over voiced frames;
    c1..c20 of the orthonormal DCT of the mean log-mel spectrum (dB, 40 Slaney bands 50 Hz - 8 kHz, 25 ms Hann
    frames every 10 ms) over frames within 40 dB of the loudest]. The pitch entries are NaN if no frame is voiced.
    """
    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be non-empty mono [N], got shape {list(audio.shape)}")
    f0, voiced = f0_track(audio, sample_rate)
    semitones = 12.0 * np.log2(f0[voiced] / 100.0)
    if semitones.size:
        centre = np.median(semitones)
        pitch = [centre, MAD_TO_STD * np.median(np.abs(semitones - centre))]
    else:
        pitch = [np.nan, np.nan]

    window = round(WINDOW_S * sample_rate)
    fb = mel_filterbank(sample_rate, window, N_MELS, FMIN, min(FMAX, sample_rate / 2))
    log_mel = 10.0 * np.log10(fb @ stft_magnitude(audio, window, round(HOP_S * sample_rate)) ** 2 + 1e-20)
    frame_db = 10.0 * np.log10(np.sum(10.0 ** (log_mel / 10.0), axis=0))
    envelope = log_mel[:, frame_db > frame_db.max() - ACTIVE_DB].mean(axis=1)
    cepstra = dct(envelope, type=2, norm="ortho")[1:N_CEPSTRA + 1]
    return np.concatenate([pitch, cepstra])


def feature_scale(voices: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Pooled within-voice standard deviation float64 [22] of `speaker_features` vectors, grouped by voice (several
    utterances of each reference voice, at least one voice with two), to pass as `scale` to `speaker_distance`:
    distances then count in units of how much one voice varies from utterance to utterance."""
    groups = [np.stack([np.asarray(f, np.float64) for f in voice]) for voice in voices if len(voice)]
    dof = sum(len(g) - 1 for g in groups)
    if dof < 1:
        raise ValueError("feature_scale needs a voice with at least two feature vectors")
    sum_sq = sum(np.sum((g - g.mean(axis=0)) ** 2, axis=0) for g in groups)
    return np.maximum(np.sqrt(sum_sq / dof), 1e-6)


def speaker_distance(a_feats: np.ndarray, b_feats: np.ndarray, scale: np.ndarray | None = None,
                     pitch_weight: float = 0.5) -> float:
    """Distance >= 0 between two `speaker_features` vectors [22] (NaN if either lacks voiced frames).

    Why it separates voices: synthetic voices differ in register (F0 on a log scale, so a shift counts the same at
    any pitch) and in vocal-tract shape (the formant pattern of the long-term envelope), and both stay put from
    sentence to sentence of one voice while the text only moves them a little. On 3 s espeak-ng sentences, median F0
    varies ~1 semitone within a voice against 4-20 between voices, and the envelope ~4.4 dB RMS within a voice
    against ~7 dB between voices of different timbre.

    The difference is divided per dimension by `scale` [22]; the mean squares over the 2 pitch dimensions and over
    the 20 cepstral dimensions are mixed with weights `pitch_weight` and 1 - `pitch_weight`, and the square root is
    taken. Averaging within each part gives register and timbre equal say by default although timbre has ten times
    as many dimensions. The default scale (`DEFAULT_SCALE`) is 1 semitone for the F0 median and spread and a 4 dB
    RMS difference between the loudness-normalised log-mel envelopes (by Parseval for the orthonormal DCT, the
    c1..c20 distance over sqrt(40 bands)), about the spread between sentences of one espeak-ng voice; with
    reference recordings, `feature_scale` measures that spread per dimension instead.
    """
    a, b = np.asarray(a_feats, np.float64), np.asarray(b_feats, np.float64)
    s = DEFAULT_SCALE if scale is None else np.asarray(scale, np.float64)
    if not a.shape == b.shape == s.shape == DEFAULT_SCALE.shape:
        raise ValueError(f"need feature and scale vectors of shape {list(DEFAULT_SCALE.shape)}, "
                         f"got {list(a.shape)}, {list(b.shape)} and {list(s.shape)}")
    if not 0.0 <= pitch_weight <= 1.0:
        raise ValueError(f"pitch_weight must be in [0, 1], got {pitch_weight}")
    z = (a - b) / s
    pitch, timbre = np.mean(z[:N_PITCH] ** 2), np.mean(z[N_PITCH:] ** 2)
    return float(np.sqrt(pitch_weight * pitch + (1.0 - pitch_weight) * timbre))


def closer_to_prompt(output: np.ndarray, prompt_a: np.ndarray, prompt_b: np.ndarray,
                     sample_rate: int = SAMPLE_RATE, scale: np.ndarray | None = None) -> bool:
    """True if float mono audio `output` [N] is closer in `speaker_distance` to `prompt_a` than to `prompt_b`
    (False on a tie or when a distance is NaN)."""
    out, a, b = (speaker_features(x, sample_rate) for x in (output, prompt_a, prompt_b))
    return bool(speaker_distance(out, a, scale) < speaker_distance(out, b, scale))
