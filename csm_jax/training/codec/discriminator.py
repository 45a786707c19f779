"""Multi-scale STFT discriminator (EnCodec's MS-STFTD): one 2-D conv net per STFT resolution over the real and
imaginary parts, LeakyReLU(0.2), dilated in time, strided in frequency. Channels-last: [B, frames, bins, C]."""

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
    adversarial terms use (None: all; fewer makes the stage cheaper on CPU)."""

    windows: tuple[int, ...] = (2048, 1024, 512)
    filters: int = 32
    dilations: tuple[int, ...] = (1, 2, 4)
    batch: int | None = None

    def __post_init__(self) -> None:
        if not self.windows or min(self.windows) < 16:
            raise ValueError(f"discriminator windows must be >= 16, got {self.windows}")
        if self.filters < 1:
            raise ValueError("discriminator filters must be >= 1")
        if self.batch is not None and self.batch < 1:
            raise ValueError("discriminator batch must be >= 1 or null")


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


class MultiScaleSTFTDiscriminator(nn.Module):
    cfg: DiscriminatorConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        """x float32 [B, N] -> (logits per scale, feature maps per scale)."""
        outs = [STFTDiscriminator(w, self.cfg.filters, self.cfg.dilations, name=f"stft_{w}")(x)
                for w in self.cfg.windows]
        return [o[0] for o in outs], [o[1] for o in outs]
