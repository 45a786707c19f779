"""Signal-level comparison of a resynthesised or generated waveform with its reference: multi-scale mel distance (the
codec metric DAC and EnCodec report) and scale-invariant SNR. Inputs are float mono waveforms [N]; when the two
lengths differ, both are cut to the shorter one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.signal import get_window

from csm_jax.audio.processor import SAMPLE_RATE

MEL_SCALES = ((2048, 320), (1024, 160), (512, 80), (256, 40), (128, 20), (64, 10), (32, 5))  # (window, mel bands)
MEL_CLAMP = 1e-5

_LINEAR_HZ_PER_MEL = 200.0 / 3  # Slaney's mel scale: linear to 1 kHz (= 15 mel), logarithmic above
_LOG_MEL_PER_OCTAVE = 27.0 / np.log(6.4)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    return np.where(hz < 1000.0, hz / _LINEAR_HZ_PER_MEL,
                    15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * _LOG_MEL_PER_OCTAVE)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel < 15.0, mel * _LINEAR_HZ_PER_MEL, 1000.0 * np.exp((mel - 15.0) / _LOG_MEL_PER_OCTAVE))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Slaney-style mel filterbank (the librosa default): triangles equally spaced on Slaney's mel scale between
    `fmin` and `fmax` (default Nyquist) Hz, each scaled to unit area (2 / bandwidth in Hz).

    Returns float64 [n_mels, n_fft // 2 + 1], to multiply a one-sided spectrum [..., n_fft // 2 + 1, T] from the left.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2} Hz, got fmin={fmin}, fmax={fmax}")
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)[None, :]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)))
    return tri * (2.0 / (hi - lo))


def stft_magnitude(audio: np.ndarray, window: int, hop: int) -> np.ndarray:
    """|STFT| of float audio [N] with a periodic Hann window of `window` samples (= FFT size), frames centred on
    multiples of `hop` (reflect padding of window // 2 at both ends, as torch.stft(center=True)).

    Returns float64 [window // 2 + 1, 1 + N // hop], unnormalised (a full-scale sine peaks at window / 4).
    """
    x = np.asarray(audio, np.float64)
    x = np.pad(x, window // 2, mode="reflect" if x.size > window // 2 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(x, window)[::hop]
    return np.abs(np.fft.rfft(frames * get_window("hann", window), axis=-1)).T


def _pair(ref: np.ndarray, est: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, est = np.asarray(ref, np.float64), np.asarray(est, np.float64)
    if ref.ndim != 1 or est.ndim != 1 or ref.size == 0 or est.size == 0:
        raise ValueError(f"need two non-empty mono waveforms [N], got shapes {list(ref.shape)} and {list(est.shape)}")
    n = min(ref.size, est.size)
    return ref[:n], est[:n]


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE,
                 scales: Sequence[tuple[int, int]] = MEL_SCALES) -> float:
    """Multi-scale mel distance between float waveforms [N], as DAC's mel loss (its training configuration: log term
    only, magnitude mel, clamp 1e-5): for each (window, n_mels) in `scales` (default windows 2048..32 samples with
    320..5 bands), the mean absolute difference of log10(max(mel, 1e-5)) over bands and frames, where mel =
    `mel_filterbank` (0 Hz to Nyquist) x `stft_magnitude` (hop = window / 4); the per-scale means are summed.
    0 for identical signals; units are log10 magnitude, summed over scales. Window sizes are in samples, so values
    at 24 kHz are not directly comparable with those reported at 44.1 kHz.
    """
    ref, est = _pair(ref, est)
    total = 0.0
    for window, n_mels in scales:
        fb = mel_filterbank(sample_rate, window, n_mels)
        log_ref, log_est = (np.log10(np.maximum(fb @ stft_magnitude(x, window, window // 4), MEL_CLAMP))
                            for x in (ref, est))
        total += float(np.mean(np.abs(log_ref - log_est)))
    return total


def si_snr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant SNR in dB of float waveforms [N] (Le Roux et al., 2019): both made zero-mean, the estimate is
    split into its projection on the reference (target) and the rest (noise), and 10 log10(|target|^2 / |noise|^2)
    is returned; +inf when the estimate is exactly a scaled reference. The reference must not be constant.
    """
    ref, est = _pair(ref, est)
    ref, est = ref - ref.mean(), est - est.mean()
    energy = float(ref @ ref)
    if energy == 0.0:
        raise ValueError("si_snr is undefined for a constant (silent) reference")
    target = (est @ ref) / energy * ref
    noise = est - target
    noise_energy = float(noise @ noise)
    return float("inf") if noise_energy == 0.0 else float(10.0 * np.log10(float(target @ target) / noise_energy))
