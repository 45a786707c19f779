"""Low-precision CSM weights: parameters stored in the compute dtype, and weight-only int8 or bf16 projections.

    params, cfg = cast_params(params, "bfloat16"), cfg.replace(dtype="bfloat16")   # bf16 weights, bf16 compute
    params, cfg = quantize_params(params, cfg, "int8")                             # int8 kernels + scales
    params, cfg = quantize_params(params, cfg, "bf16", "float32")                  # bf16 kernels, float32 compute

Weight-only modes store every projection kernel of the backbone and the depth decoder (q/k/v, o, gate, up, down),
the projection and both heads in low precision and compute in another dtype (default: the backend policy's
`quantized_compute_dtype`, float32 on CPU, bfloat16 on accelerators); embeddings and norms are stored in the
compute dtype.
- int8: `q` plus float32 scales `s` per output channel (symmetric: s = max|w| / 127 over the input dimension,
  q = round(w / s)), stored next to it as `<name>_scale` (`kernel_scale` inside a Linear). The model multiplies by
  int8 -> compute dtype and applies the scale to the float32 accumulator (`llama.linear`), so XLA fuses the
  dequantisation into the product.
- bf16: the kernels rounded to bfloat16, read as the compute dtype inside each product. Computing in float32 halves
  the weight bytes a decode step reads while the products' inputs keep float32 precision: codebook-0 top-1 agrees
  with float32 on 98.8 % of the default voice's rows against 98.1 % with bf16 compute (session 20's checkpoint:
  99.4 against 98.8 %; `bench/precision_bench.py`). An accelerator option: XLA:CPU widens bf16 slowly (10x slower than float32 there).
A tree's mode is told apart by its parameters alone (`quantization`): the checkpoint format (`save_converted`) and
`CsmConfig` are unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from csm_jax import backend
from csm_jax.csm.config import CsmConfig

MODES = ("int8", "bf16")
SCALE_SUFFIX = "_scale"
_TOP_LEVEL = ("projection", "codebook0_head", "audio_head")  # Csm's own kernels; the stacks' are named `kernel`


def is_kernel(path: tuple[str, ...]) -> bool:
    """Whether a parameter path names a projection kernel (the parameters int8 quantisation applies to)."""
    return path[-1] == "kernel" or (len(path) == 1 and path[0] in _TOP_LEVEL)


def quantization(params: Any) -> str | None:
    """A CSM parameter tree's weight-only mode: "int8" (it holds per-channel scales), "bf16" (bfloat16 kernels), or
    None (kernels in the same dtype as the rest)."""
    flat = flax.traverse_util.flatten_dict(params)
    if any(p[-1].endswith(SCALE_SUFFIX) for p in flat):
        return "int8"
    kernels = {v.dtype for p, v in flat.items() if is_kernel(p)}
    others = {v.dtype for p, v in flat.items() if not is_kernel(p)}
    return "bf16" if kernels == {jnp.dtype(jnp.bfloat16)} and kernels != others else None


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A kernel [*out, in] -> (int8 [*out, in], float32 scales [*out]), symmetric per output channel."""
    xp = np if isinstance(w, np.ndarray) else jnp  # host arrays stay on the host (e.g. before sharding)
    w = w.astype(np.float32)
    absmax = xp.max(xp.abs(w), axis=-1)
    scale = xp.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = xp.clip(xp.round(w / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """int8 [*out, in] and scales [*out] -> the kernel they stand for."""
    return (q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def cast_params(params: Any, dtype: Any) -> Any:
    """Floating parameters cast to `dtype` (int8 kernels and their float32 scales are kept as they are)."""
    flat = flax.traverse_util.flatten_dict(params)
    out = {p: v if (p[-1].endswith(SCALE_SUFFIX) or not jnp.issubdtype(v.dtype, jnp.floating)
                    or v.dtype == jnp.dtype(dtype)) else v.astype(dtype) for p, v in flat.items()}
    return flax.traverse_util.unflatten_dict(out)


def quantize_params(params: Any, cfg: CsmConfig, mode: str = "int8", dtype: str | None = None
                    ) -> tuple[Any, CsmConfig]:
    """Float CSM params -> (params with `mode` kernels (int8 + per-output-channel scales, or bf16), config). The
    other parameters are stored in the compute dtype: `dtype`, default the backend policy's
    `quantized_compute_dtype` (float32 on CPU, bfloat16 on accelerators; see `csm_jax.backend`); the returned
    config computes in it. A tree already in `mode` is only cast; an int8 tree cannot become bf16."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; supported: {list(MODES)}")
    dtype = dtype or backend.current().quantized_compute_dtype
    cfg = cfg.replace(dtype=str(jnp.dtype(dtype)))
    params = nn.meta.unbox(params)
    stored = quantization(params)
    if stored == "int8" and mode == "bf16":
        raise ValueError("these parameters are int8 already; bf16 weights need the float checkpoint")
    if stored == "int8":
        return cast_params(params, cfg.compute_dtype), cfg
    flat = flax.traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        if not is_kernel(path):
            out[path] = value if value.dtype == cfg.compute_dtype else value.astype(cfg.compute_dtype)
        elif mode == "int8":
            out[path], out[(*path[:-1], path[-1] + SCALE_SUFFIX)] = quantize_int8(value)
        else:
            out[path] = value if value.dtype == jnp.bfloat16 else value.astype(jnp.bfloat16)
    return flax.traverse_util.unflatten_dict(out), cfg


def abstract_quantized(abstract: Any, cfg: CsmConfig, mode: str) -> Any:
    """The ShapeDtypeStruct tree `quantize_params` makes in `mode` from float params shaped like `abstract`,
    computing in `cfg.dtype` (what a converted checkpoint in that mode holds)."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, mode, cfg.dtype)[0], abstract)


def boxed_like(boxed: Any, params: Any) -> Any:
    """A tree of `nn.Partitioned` boxes (`jax.eval_shape(model.init, ...)["params"]`) extended to `params`' scales:
    each scale is laid out as its kernel's output dimensions (for `sharding.tree_shardings`)."""
    if quantization(params) != "int8":
        return boxed
    flat = flax.traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    out = dict(flat)
    for path in flax.traverse_util.flatten_dict(params):
        if path[-1].endswith(SCALE_SUFFIX):
            kernel = flat[(*path[:-1], path[-1][: -len(SCALE_SUFFIX)])]
            value = jax.ShapeDtypeStruct(kernel.value.shape[:-1], jnp.float32)
            out[path] = nn.Partitioned(value, names=kernel.names[:-1], mesh=kernel.mesh)
    return flax.traverse_util.unflatten_dict(out)
