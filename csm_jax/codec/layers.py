"""Causal 1-D convolutions with exact offline padding and explicit streaming state.

Activations are channels-last: float [B, T, C]. Each layer has an offline `__call__` that pads like the
reference (moshi 0.2.2 / transformers `MimiConv1d`) and a `step` that consumes whole strides of input with a
state pytree carried by the caller (`init_state`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

State = dict[str, jax.Array]


class CausalConv1d(nn.Module):
    """Causal Conv1d. kernel: float32 [k, C_in/groups, C_out] (torch weight [C_out, C_in/g, k] transposed)."""

    in_features: int
    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    pad_mode: str = "constant"  # or "replicate"
    dtype: jnp.dtype = jnp.float32

    @property
    def k_eff(self) -> int:
        return (self.kernel_size - 1) * self.dilation + 1

    @property
    def context(self) -> int:
        """Input samples carried between streaming steps (`k_eff - stride`)."""
        return self.k_eff - self.stride

    def setup(self) -> None:
        shape = (self.kernel_size, self.in_features // self.groups, self.features)
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        if self.use_bias:
            self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def _conv(self, x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel.astype(self.dtype),
            window_strides=(self.stride,),
            padding="VALID",
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        return y + self.bias.astype(self.dtype) if self.use_bias else y

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, C_in] -> [B, ceil(T / stride), C_out], padded as the reference does offline."""
        length = x.shape[1]
        n_frames = math.ceil((length - self.k_eff + self.context) / self.stride + 1) - 1
        extra = n_frames * self.stride + self.k_eff - self.context - length
        mode = "edge" if self.pad_mode == "replicate" else "constant"
        x = jnp.pad(x, ((0, 0), (self.context, extra), (0, 0)), mode=mode)
        return self._conv(x)

    def init_state(self, batch_size: int) -> State:
        """Zero history [B, k_eff - stride, C_in]; replicate mode also tracks whether a stream has started."""
        state = {"previous": jnp.zeros((batch_size, self.context, self.in_features), jnp.float32)}
        if self.pad_mode == "replicate":
            state["started"] = jnp.zeros((batch_size,), jnp.bool_)
        return state

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """x: [B, n*stride, C_in] -> ([B, n, C_out], new state). Equals offline on the concatenated stream."""
        previous = state["previous"].astype(x.dtype)
        new_state = {}
        if "started" in state:
            first = jnp.broadcast_to(x[:, :1], previous.shape)
            previous = jnp.where(state["started"][:, None, None], previous, first)
            new_state["started"] = jnp.ones_like(state["started"])
        full = jnp.concatenate([previous, x], axis=1)
        new_state["previous"] = full[:, full.shape[1] - self.context :].astype(jnp.float32)
        return self._conv(full), new_state


class CausalConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d, right-trimmed by `kernel_size - stride` (kernel_size must be a multiple of stride).

    Computed in polyphase form: with m = kernel_size / stride taps of `stride` outputs each, output block t is
    sum_j x[t - j] @ W_j, so the layer is one matmul on [x_t, x_{t-1}, ...] followed by depth-to-space. The
    streaming state is the last m - 1 input steps.

    kernel: float32 [m, C_in, stride, C_out/groups]; kernel[j, i, r, o] = torch weight[i, o, j * stride + r].
    Supports groups == 1 and depthwise (groups == C_in == C_out).
    """

    in_features: int
    features: int
    kernel_size: int
    stride: int
    groups: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @property
    def taps(self) -> int:
        return self.kernel_size // self.stride

    def setup(self) -> None:
        if self.kernel_size % self.stride:
            raise ValueError(f"kernel_size {self.kernel_size} must be a multiple of stride {self.stride}")
        if self.groups not in (1, self.in_features) or (self.groups > 1 and self.features != self.in_features):
            raise ValueError("only groups == 1 or depthwise (groups == in_features == features) are supported")
        shape = (self.taps, self.in_features, self.stride, self.features // self.groups)
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        if self.use_bias:
            self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def _blocks(self, x: jax.Array) -> jax.Array:
        """x: [B, m - 1 + T, C_in] (history first) -> [B, T * stride, C_out]."""
        b, length, c_in = x.shape
        t, m = length - self.taps + 1, self.taps
        shifted = [x[:, m - 1 - j : m - 1 - j + t] for j in range(m)]  # x[t - j]
        kernel = self.kernel.astype(self.dtype)
        if self.groups == 1:
            y = jnp.concatenate(shifted, axis=-1) @ kernel.reshape(m * c_in, -1)  # [B, T, stride * C_out]
        else:  # depthwise: y[t, r, c] = sum_j x[t - j, c] * kernel[j, c, r]
            y = sum(xs[:, :, None, :] * kernel[j, :, :, 0].T for j, xs in enumerate(shifted))
        y = y.reshape(b, t * self.stride, self.features)
        return y + self.bias.astype(self.dtype) if self.use_bias else y

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, C_in] -> [B, T * stride, C_out]."""
        x = x.astype(self.dtype)
        return self._blocks(jnp.pad(x, ((0, 0), (self.taps - 1, 0), (0, 0))))

    def init_state(self, batch_size: int) -> State:
        """Zero input history [B, m - 1, C_in]."""
        return {"previous": jnp.zeros((batch_size, self.taps - 1, self.in_features), jnp.float32)}

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """x: [B, T, C_in] -> ([B, T * stride, C_out], new state)."""
        full = jnp.concatenate([state["previous"].astype(self.dtype), x.astype(self.dtype)], axis=1)
        new_state = {"previous": full[:, full.shape[1] - (self.taps - 1) :].astype(jnp.float32)}
        return self._blocks(full), new_state


class ResBlock(nn.Module):
    """SEANet residual block: x + Conv_k1(ELU(Conv_k(ELU(x)))), channels C -> C/compress -> C."""

    dim: int
    kernel_size: int
    dilation: int
    compress: int
    pad_mode: str
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        hidden = self.dim // self.compress
        self.conv1 = CausalConv1d(self.dim, hidden, self.kernel_size, dilation=self.dilation, pad_mode=self.pad_mode,
                                  dtype=self.dtype)
        self.conv2 = CausalConv1d(hidden, self.dim, 1, pad_mode=self.pad_mode, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(nn.elu(self.conv1(nn.elu(x))))

    def init_state(self, batch_size: int) -> State:
        return {"conv1": self.conv1.init_state(batch_size)}

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        h, s1 = self.conv1.step(nn.elu(x), state["conv1"])
        return x + self.conv2(nn.elu(h)), {"conv1": s1}
