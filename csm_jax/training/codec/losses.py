"""Codec reconstruction and adversarial losses on float32 waveforms [B, N].

- `mel_loss`: multi-scale mel (DAC-style): L1 between log10 mel magnitudes (clamped at 1e-5) for each window
  size, `n_mels` growing with the window, summed over scales.
- `stft_loss`: multi-resolution STFT (Parallel WaveGAN-style): spectral convergence plus L1 of log magnitudes.
- `waveform_l1`: mean absolute error of the samples.
- `periodicity_loss`: pitch supervision. On the frames the reference voices, the reconstruction's normalised
  autocorrelation at the reference's pitch period (and at half of it) should equal the reference's own.
- `hinge_discriminator` / `hinge_generator` / `feature_matching`: EnCodec's adversarial terms.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RECONSTRUCTION = ("mel", "stft", "waveform")


def stft(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """x float32 [B, N] -> complex64 [B, frames, n_fft // 2 + 1], Hann window, reflect-free (zero) centre padding."""
    pad = n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)))
    frames = 1 + (x.shape[1] - n_fft) // hop
    idx = jnp.arange(n_fft)[None, :] + hop * jnp.arange(frames)[:, None]
    window = jnp.asarray(np.hanning(n_fft + 1)[:-1], jnp.float32)
    return jnp.fft.rfft(x[:, idx] * window, axis=-1)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
                   ) -> np.ndarray:
    """HTK-scale triangular filters, float32 [n_fft // 2 + 1, n_mels], each normalised to unit area (Slaney)."""
    fmax = fmax or sample_rate / 2
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)  # noqa: E731
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower = (freqs[:, None] - edges[None, :-2]) / np.maximum(edges[1:-1] - edges[:-2], 1e-9)
    upper = (edges[None, 2:] - freqs[:, None]) / np.maximum(edges[2:] - edges[1:-1], 1e-9)
    fb = np.maximum(0.0, np.minimum(lower, upper))
    fb *= 2.0 / (edges[2:] - edges[:-2])[None, :]
    return fb.astype(np.float32)


def _magnitude(spec: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2, 1e-12))


def mel_loss(ref: jax.Array, est: jax.Array, sample_rate: int, windows: Sequence[int] = (32, 64, 128, 256, 512,
             1024, 2048), mels: Sequence[int] = (5, 10, 20, 40, 80, 160, 320)) -> jax.Array:
    """Sum over scales of mean |log10 mel(ref) - log10 mel(est)| (hop = window / 4)."""
    if len(windows) != len(mels):
        raise ValueError("mel_loss needs one n_mels per window")
    total = jnp.zeros((), jnp.float32)
    for win, n_mels in zip(windows, mels):
        fb = jnp.asarray(mel_filterbank(sample_rate, win, n_mels))
        mel = lambda x: jnp.log10(jnp.maximum(_magnitude(stft(x, win, win // 4)) @ fb, 1e-5))  # noqa: E731,B023
        total = total + jnp.mean(jnp.abs(mel(ref) - mel(est)))
    return total


def stft_loss(ref: jax.Array, est: jax.Array, windows: Sequence[int] = (512, 1024, 2048)) -> jax.Array:
    """Sum over resolutions of spectral convergence + mean |log mag(ref) - log mag(est)| (hop = window / 4)."""
    total = jnp.zeros((), jnp.float32)
    for win in windows:
        r, e = _magnitude(stft(ref, win, win // 4)), _magnitude(stft(est, win, win // 4))
        sc = jnp.linalg.norm(r - e) / jnp.maximum(jnp.linalg.norm(r), 1e-7)
        total = total + sc + jnp.mean(jnp.abs(jnp.log(jnp.maximum(r, 1e-5)) - jnp.log(jnp.maximum(e, 1e-5))))
    return total


def waveform_l1(ref: jax.Array, est: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(ref - est))


def _normalised_autocorrelation(x: jax.Array, starts: jax.Array, lags: jax.Array, window: int) -> jax.Array:
    """x float32 [B, N]; starts int32 [B, T] (first sample of each window); lags float32 [B, T] (samples, >= 1) ->
    float32 [B, T]: sum x[n] x[n + lag] / sqrt(sum x[n]^2 sum x[n + lag]^2) over the `window` samples from each
    start, fractional lags by linear interpolation. Indices past the signal are clamped (callers mask them)."""
    n = starts[..., None] + jnp.arange(window)  # [B, T, W]
    whole = jnp.floor(lags).astype(jnp.int32)[..., None]
    frac = (lags - jnp.floor(lags))[..., None]
    last = x.shape[1] - 1
    take = jax.vmap(lambda row, idx: row[jnp.clip(idx, 0, last)])
    here = take(x, n)
    there = (1.0 - frac) * take(x, n + whole) + frac * take(x, n + whole + 1)
    num = jnp.sum(here * there, -1)
    return num / jnp.sqrt(jnp.maximum(jnp.sum(here**2, -1) * jnp.sum(there**2, -1), 1e-12))


def periodicity_loss(ref: jax.Array, est: jax.Array, f0: jax.Array, sample_rate: int, time_step: float = 0.01,
                     window_s: float = 0.04) -> jax.Array:
    """Pitch loss: mean over the frames the reference voices of |rho_ref(P) - rho_est(P)| + |rho_ref(P/2) -
    rho_est(P/2)|, where rho is the normalised autocorrelation over a `window_s` window centred on the frame and
    P = sample_rate / f0 the reference's period (rho at P/2 tells an octave-up rendering apart).

    ref, est float32 [B, N]; f0 float32 [B, T] in Hz, 0 where unvoiced, on `csm_jax.evaluation.pitch.f0_track`'s
    grid (frames `time_step` s apart, centred in the N samples). Unlike spectral distances, whose gradient with
    respect to F0 oscillates as harmonics slide past each other, this pulls each sample towards the samples one
    reference period away, so it teaches a decoder where the period is however far off its pitch starts.
    """
    window = round(window_s * sample_rate)
    frames = f0.shape[1]
    first = (ref.shape[1] / sample_rate - (frames - 1) * time_step) / 2
    centres = jnp.round((first + time_step * jnp.arange(frames)) * sample_rate).astype(jnp.int32)
    starts = jnp.broadcast_to(centres - window // 2, f0.shape)
    voiced = f0 > 0
    period = sample_rate / jnp.where(voiced, f0, 1.0)
    valid = voiced & (starts >= 0) & (starts + window + period + 1 < ref.shape[1])
    total = jnp.zeros(f0.shape, jnp.float32)
    for lag in (period, period / 2):
        total += jnp.abs(_normalised_autocorrelation(ref, starts, lag, window)
                         - _normalised_autocorrelation(est, starts, lag, window))
    return jnp.sum(jnp.where(valid, total, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def hinge_discriminator(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Mean over discriminators of E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    terms = [jnp.mean(jax.nn.relu(1 - r)) + jnp.mean(jax.nn.relu(1 + f)) for r, f in zip(real_logits, fake_logits)]
    return sum(terms) / len(terms)


def hinge_generator(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Mean over discriminators of E[relu(1 - D(fake))]."""
    return sum(jnp.mean(jax.nn.relu(1 - f)) for f in fake_logits) / len(fake_logits)


def feature_matching(real_feats: Sequence[Sequence[jax.Array]], fake_feats: Sequence[Sequence[jax.Array]]
                     ) -> jax.Array:
    """Mean over discriminators and layers of |f_real - f_fake|_1 / mean |f_real| (EnCodec's relative L1)."""
    terms = []
    for real_layers, fake_layers in zip(real_feats, fake_feats):
        for r, f in zip(real_layers, fake_layers):
            r = jax.lax.stop_gradient(r)
            terms.append(jnp.mean(jnp.abs(r - f)) / jnp.maximum(jnp.mean(jnp.abs(r)), 1e-6))
    return sum(terms) / len(terms)
