"""SEANet convolutional encoder (waveform -> 25 Hz features) and decoder ("vocoder": features -> waveform).

Layers are keyed by the reference layer index (an ELU sits at every index without a layer), so checkpoint
keys map 1:1.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from csm_jax.codec.config import MimiConfig
from csm_jax.codec.layers import CausalConv1d, CausalConvTranspose1d, ResBlock, State


class _ConvStack(nn.Module):
    """Runs `self.layers` (index -> layer) in order with ELUs in the gaps, offline or one stream step."""

    cfg: MimiConfig

    def _build(self) -> dict[int, nn.Module]:
        raise NotImplementedError

    def setup(self) -> None:
        self.layers = {str(i): layer for i, layer in self._build().items()}

    def _run(self, x: jax.Array, state: State | None) -> tuple[jax.Array, State]:
        new_state: State = {}
        prev = -1
        for i in sorted(self.layers, key=int):
            if int(i) - prev > 1:
                x = nn.elu(x)
            prev = int(i)
            if state is not None and i in state:
                x, new_state[i] = self.layers[i].step(x, state[i])
            else:
                x = self.layers[i](x)
        return x, new_state

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._run(x, None)[0]

    def init_state(self, batch_size: int) -> State:
        state = {}
        for i, layer in self.layers.items():
            if not isinstance(layer, CausalConv1d) or layer.context > 0:
                state[i] = layer.init_state(batch_size)
        return state

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        return self._run(x, state)


def _resblocks(cfg: MimiConfig, dim: int, start: int) -> dict[int, ResBlock]:
    return {
        start + j: ResBlock(dim, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, cfg.pad_mode,
                            dtype=cfg.compute_dtype)
        for j in range(cfg.num_residual_layers)
    }


class SEANetEncoder(_ConvStack):
    """float [B, N, channels] -> [B, ceil(N / hop_length), hidden_size]; `step` takes n * hop_length samples."""

    def _build(self) -> dict[int, nn.Module]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        layers: dict[int, nn.Module] = {
            0: CausalConv1d(cfg.channels, cfg.num_filters, cfg.kernel_size, pad_mode=cfg.pad_mode, dtype=dt)
        }
        idx, dim = 1, cfg.num_filters
        for ratio in reversed(cfg.ratios):
            layers.update(_resblocks(cfg, dim, idx))
            idx += cfg.num_residual_layers + 1  # resblocks, then an ELU
            layers[idx] = CausalConv1d(dim, dim * 2, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode, dtype=dt)
            idx, dim = idx + 1, dim * 2
        idx += 1  # ELU
        layers[idx] = CausalConv1d(dim, cfg.hidden_size, cfg.last_kernel_size, pad_mode=cfg.pad_mode, dtype=dt)
        return layers


def convtr_indices(cfg: MimiConfig) -> list[int]:
    """Reference indices of the decoder's transposed convolutions: ELU, ConvT, resblocks per ratio after conv 0."""
    return [2 + i * (2 + cfg.num_residual_layers) for i in range(len(cfg.ratios))]


class SEANetDecoder(_ConvStack):
    """The vocoder: float [B, T, hidden_size] -> waveform [B, T * hop_length, channels]."""

    def _build(self) -> dict[int, nn.Module]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        dim = cfg.num_filters * 2 ** len(cfg.ratios)
        layers: dict[int, nn.Module] = {
            0: CausalConv1d(cfg.hidden_size, dim, cfg.kernel_size, pad_mode=cfg.pad_mode, dtype=dt)
        }
        for idx, ratio in zip(convtr_indices(cfg), cfg.ratios):  # each preceded by an ELU
            layers[idx] = CausalConvTranspose1d(dim, dim // 2, 2 * ratio, ratio, dtype=dt)
            layers.update(_resblocks(cfg, dim // 2, idx + 1))
            dim //= 2
        idx = max(layers) + 2  # ELU, then the last conv
        layers[idx] = CausalConv1d(dim, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode, dtype=dt)
        return layers
