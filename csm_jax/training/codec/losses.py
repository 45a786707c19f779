"""Codec reconstruction and adversarial losses on float32 waveforms [B, N].

- `mel_loss`: multi-scale mel (DAC-style): L1 between log10 mel magnitudes (clamped at 1e-5) for each window
  size, `n_mels` growing with the window, summed over scales.
- `stft_loss`: multi-resolution STFT (Parallel WaveGAN-style): spectral convergence plus L1 of log magnitudes.
- `waveform_l1`: mean absolute error of the samples.
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
