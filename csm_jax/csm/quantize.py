"""Low-precision CSM weights: parameters stored in the compute dtype, and weight-only int8 or bf16 projections.

    params, cfg = cast_params(params, "bfloat16"), cfg.replace(dtype="bfloat16")   # bf16 weights, bf16 compute
    params, cfg = quantize_params(params, cfg, "int8")                             # int8 kernels + scales
    params, cfg = quantize_params(params, cfg, "bf16", "float32")                  # bf16 kernels, float32 compute

Weight-only modes store every projection kernel of the backbone and the depth decoder (q/k/v, o, gate, up, down),
the projection and the depth decoder's heads in low precision and compute in another dtype (default: the backend
policy's `quantized_compute_dtype`, float32 on CPU, bfloat16 on accelerators); embeddings, norms and the kernels
in `FLOAT_KERNELS` are stored in the compute dtype. That is codebook 0's head, as bitsandbytes leaves a language
model's head out: 0.35 % of CSM-1B's weights, read once a frame, and the one product whose rounding decides the
semantic token directly. On the default voice it lifts codebook-0 top-1 agreement with float32 from 96.8 to 97.7 %
(int8) and from 98.8 to 99.3 % (bf16 weights, float32 compute; `bench/precision_bench.py`).
- int8: `q` plus float32 scales `s` per output channel (symmetric: s = max|w| / 127 over the input dimension,
  q = round(w / s)), stored next to it as `<name>_scale` (`kernel_scale` inside a Linear). The model multiplies by
  int8 -> compute dtype and applies the scale to the float32 accumulator (`llama.linear`), so XLA fuses the
  dequantisation into the product.
- bf16: the kernels rounded to bfloat16, read as the compute dtype inside each product. Computing in float32 halves
  the weight bytes a decode step reads while the products' inputs keep float32 precision: codebook-0 top-1 agrees
  with float32 on 99.3 % of the default voice's rows against 98.1 % with bf16 compute. An accelerator option:
  XLA:CPU widens bf16 slowly (10x slower than float32 there).
A tree's mode is told apart by its parameters alone (`quantization`), and which kernels it left in the compute dtype
too (`float_kernels`); converted checkpoints record both (`weights.save_converted`), those converted before
`FLOAT_KERNELS` existed (every kernel quantised) load as they were saved. `CsmConfig` is unchanged.
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
FLOAT_KERNELS = ("codebook0_head",)  # kernels (paths joined by "/") weight-only modes leave in the compute dtype


def is_kernel(path: tuple[str, ...]) -> bool:
    """Whether a parameter path names a projection kernel (the parameters int8 quantisation applies to)."""
    return path[-1] == "kernel" or (len(path) == 1 and path[0] in _TOP_LEVEL)


def quantization(params: Any) -> str | None:
    """A CSM parameter tree's weight-only mode: "int8" (it holds per-channel scales), "bf16" (bfloat16 kernels), or
    None (kernels in the same dtype as the rest)."""
    flat = flax.traverse_util.flatten_dict(params)
    if any(p[-1].endswith(SCALE_SUFFIX) for p in flat):
        return "int8"
    kernels = {v.dtype for p, v in flat.items() if is_kernel(p) and "/".join(p) not in FLOAT_KERNELS}
    others = {v.dtype for p, v in flat.items() if not is_kernel(p)}
    return "bf16" if kernels == {jnp.dtype(jnp.bfloat16)} and kernels != others else None


def float_kernels(params: Any) -> tuple[str, ...]:
    """The kernels (paths joined by "/") a weight-only tree holds in the compute dtype: an int8 tree's kernels
    without scales, a bf16 tree's kernels not in bfloat16; () for a float tree."""
    mode = quantization(params)
    if mode is None:
        return ()
    flat = flax.traverse_util.flatten_dict(params)
    if mode == "int8":
        return tuple("/".join(p) for p in flat if is_kernel(p) and (*p[:-1], p[-1] + SCALE_SUFFIX) not in flat)
    return tuple("/".join(p) for p, v in flat.items() if is_kernel(p) and v.dtype != jnp.bfloat16)


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


def quantize_params(params: Any, cfg: CsmConfig, mode: str = "int8", dtype: str | None = None,
                    keep: tuple[str, ...] = FLOAT_KERNELS) -> tuple[Any, CsmConfig]:
    """Float CSM params -> (params with `mode` kernels (int8 + per-output-channel scales, or bf16), config). The
    other parameters, and the kernels named in `keep`, are stored in the compute dtype: `dtype`, default the
    backend policy's `quantized_compute_dtype` (float32 on CPU, bfloat16 on accelerators; see `csm_jax.backend`);
    the returned config computes in it. A tree already int8 is only cast (its kernels stay as they are); an int8
    tree cannot become bf16."""
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
        if not is_kernel(path) or "/".join(path) in keep:
            out[path] = value if value.dtype == cfg.compute_dtype else value.astype(cfg.compute_dtype)
        elif mode == "int8":
            out[path], out[(*path[:-1], path[-1] + SCALE_SUFFIX)] = quantize_int8(value)
        else:
            out[path] = value if value.dtype == jnp.bfloat16 else value.astype(jnp.bfloat16)
    return flax.traverse_util.unflatten_dict(out), cfg


def abstract_quantized(abstract: Any, cfg: CsmConfig, mode: str, keep: tuple[str, ...] = FLOAT_KERNELS) -> Any:
    """The ShapeDtypeStruct tree `quantize_params` makes in `mode` from float params shaped like `abstract`,
    computing in `cfg.dtype` and keeping `keep` (what a converted checkpoint in that mode holds)."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, mode, cfg.dtype, keep)[0], abstract)


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
