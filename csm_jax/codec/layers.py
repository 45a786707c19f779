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
    """Causal ConvTranspose1d, right-trimmed by `kernel_size - stride`.

    kernel: float32 [C_in, k, C_out/groups] (torch weight [C_in, C_out/g, k] with the last two axes swapped).
    Computed as one matmul per input step followed by an overlap-add, which is exact and avoids the
    zero-stuffed convolution.
    """

    in_features: int
    features: int
    kernel_size: int
    stride: int
    groups: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @property
    def overlap(self) -> int:
        """Output samples that spill into the next step (`k - stride`), carried as streaming state."""
        return self.kernel_size - self.stride

    def setup(self) -> None:
        shape = (self.in_features, self.kernel_size, self.features // self.groups)
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        if self.use_bias:
            self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def _full(self, x: jax.Array) -> jax.Array:
        """x: [B, T, C_in] -> untrimmed, bias-free output [B, (T - 1) * stride + k, C_out]."""
        b, t, c_in = x.shape
        g = self.groups
        kernel = self.kernel
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if g == 1:  # one [B*T, C_in] x [C_in, k*C_out] matmul; the kernel is used in its stored layout
            z = (x @ kernel.reshape(c_in, -1)).reshape(b, t, self.kernel_size, self.features)
        elif g == c_in == self.features:  # depthwise: a broadcast multiply
            z = x[:, :, None, :] * kernel[:, :, 0].T[None, None]
        else:
            xg = x.reshape(b, t, g, c_in // g)
            kg = kernel.reshape(g, c_in // g, self.kernel_size, self.features // g)
            z = jnp.einsum("btgi,gikj->btkgj", xg, kg).reshape(b, t, self.kernel_size, self.features)
        s = self.stride
        m = -(-self.kernel_size // s)
        z = jnp.pad(z, ((0, 0), (0, 0), (0, m * s - self.kernel_size), (0, 0)))
        out = jnp.zeros((b, (t + m - 1) * s, self.features), z.dtype)
        for j in range(m):  # overlap-add: tap block j of step i lands at samples (i + j) * s ...
            block = z[:, :, j * s : (j + 1) * s].reshape(b, t * s, self.features)
            out = out.at[:, j * s : j * s + t * s].add(block)
        return out[:, : (t - 1) * s + self.kernel_size]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, C_in] -> [B, T * stride, C_out]."""
        y = self._full(x)[:, : x.shape[1] * self.stride]
        return y + self.bias.astype(self.dtype) if self.use_bias else y

    def init_state(self, batch_size: int) -> State:
        """Pending overlap [B, k - stride, C_out], bias not yet added."""
        return {"partial": jnp.zeros((batch_size, self.overlap, self.features), jnp.float32)}

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """x: [B, T, C_in] -> ([B, T * stride, C_out], new state)."""
        full = self._full(x)
        full = full.at[:, : self.overlap].add(state["partial"].astype(full.dtype))
        n = x.shape[1] * self.stride
        y = full[:, :n]
        new_state = {"partial": full[:, n:].astype(jnp.float32)}
        return (y + self.bias.astype(self.dtype) if self.use_bias else y), new_state


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
