"""The codec's discriminators, channels-last:

- multi-scale STFT (EnCodec's MS-STFTD): one 2-D conv net per STFT resolution over the real and imaginary parts,
  LeakyReLU(0.2), dilated in time, strided in frequency ([B, frames, bins, C]);
- multi-period (HiFi-GAN's MPD, optional): per period p the waveform folded to [B, N / p, p, 1] and 2-D convs
  strided along time only, so each one sees every p-th sample: it judges periodicity, i.e. the harmonics of voiced
  speech, which spectral losses and the STFT discriminator are slow to get right.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax.training.codec.losses import stft


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """windows: STFT sizes, one sub-discriminator each (hop = window / 4); filters: conv channels;
    dilations: time dilations of the strided middle convolutions; batch: how many sequences of each batch the
    adversarial terms use (None: all; fewer makes the stage cheaper on CPU); periods: the multi-period
    discriminator's periods (HiFi-GAN: 2, 3, 5, 7, 11; empty: none)."""

    windows: tuple[int, ...] = (2048, 1024, 512)
    filters: int = 32
    dilations: tuple[int, ...] = (1, 2, 4)
    batch: int | None = None
    periods: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.windows or min(self.windows) < 16:
            raise ValueError(f"discriminator windows must be >= 16, got {self.windows}")
        if self.filters < 1:
            raise ValueError("discriminator filters must be >= 1")
        if self.batch is not None and self.batch < 1:
            raise ValueError("discriminator batch must be >= 1 or null")
        if any(p < 2 for p in self.periods) or len(set(self.periods)) != len(self.periods):
            raise ValueError(f"discriminator periods must be distinct and >= 2, got {self.periods}")


class STFTDiscriminator(nn.Module):
    """waveform float32 [B, N] -> (logits [B, frames', bins', 1], feature maps of every layer but the last)."""

    window: int
    filters: int
    dilations: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        spec = stft(x, self.window, self.window // 4)
        h = jnp.stack([jnp.real(spec), jnp.imag(spec)], axis=-1)
        feats = []
        h = nn.leaky_relu(nn.Conv(self.filters, (3, 9), padding="SAME")(h), 0.2)
        feats.append(h)
        for d in self.dilations:
            h = nn.Conv(self.filters, (3, 9), strides=(1, 2), kernel_dilation=(d, 1), padding="SAME")(h)
            h = nn.leaky_relu(h, 0.2)
            feats.append(h)
        h = nn.leaky_relu(nn.Conv(self.filters, (3, 3), padding="SAME")(h), 0.2)
        feats.append(h)
        return nn.Conv(1, (3, 3), padding="SAME")(h), feats


class PeriodDiscriminator(nn.Module):
    """waveform float32 [B, N] -> (logits [B, frames', period, 1], feature maps of every layer but the last)."""

    period: int
    filters: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        pad = -x.shape[1] % self.period
        x = jnp.pad(x, ((0, 0), (0, pad)), mode="reflect")
        h = x.reshape(x.shape[0], -1, self.period, 1)
        feats = []
        for mult in (1, 2, 4, 4):
            h = nn.leaky_relu(nn.Conv(self.filters * mult, (5, 1), strides=(3, 1), padding="SAME")(h), 0.1)
            feats.append(h)
        h = nn.leaky_relu(nn.Conv(self.filters * 4, (5, 1), padding="SAME")(h), 0.1)
        feats.append(h)
        return nn.Conv(1, (3, 1), padding="SAME")(h), feats


class CodecDiscriminator(nn.Module):
    """Every STFT scale, then every period (when `cfg.periods` is set), as one list of sub-discriminators."""

    cfg: DiscriminatorConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        """x float32 [B, N] -> (logits per sub-discriminator, feature maps per sub-discriminator)."""
        outs = [STFTDiscriminator(w, self.cfg.filters, self.cfg.dilations, name=f"stft_{w}")(x)
                for w in self.cfg.windows]
        outs += [PeriodDiscriminator(p, self.cfg.filters, name=f"period_{p}")(x) for p in self.cfg.periods]
        return [o[0] for o in outs], [o[1] for o in outs]
