"""Map official Mimi checkpoints (transformers `model.safetensors` or moshi `tokenizer-*.safetensors`) onto the
Flax parameter tree, strictly: every tensor must be used exactly once and have the expected shape."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.seanet import convtr_indices
from csm_jax.weights import Entry, Shape, convert, rope_interleaved_to_half, same, transposed


def _conv(path: str, key: str, shape: Shape) -> Entry:
    """torch Conv1d [out, in/g, k] -> [k, in/g, out]."""
    return Entry(path, ((key, shape[::-1]),), lambda w: w.transpose(2, 1, 0))


def _convtr(path: str, key: str, shape: Shape) -> Entry:
    """torch ConvTranspose1d [in, out/g, m * stride] -> polyphase [m, in, stride, out/g]."""
    taps, c_in, stride, c_out = shape

    def combine(w: np.ndarray) -> np.ndarray:
        return w.reshape(c_in, c_out, taps, stride).transpose(2, 0, 3, 1)

    return Entry(path, ((key, (c_in, c_out, taps * stride)),), combine)


def _proj(path: str, key: str, shape: Shape) -> Entry:
    """1x1 Conv1d [out, in, 1] -> Dense [in, out]."""
    return Entry(path, ((key, (shape[1], shape[0], 1)),), lambda w: w[:, :, 0].T)


def _codebooks(path: str, keys: list[tuple[str, str]], shape: Shape) -> Entry:
    """Per-layer (embedding_sum [bins, dim], cluster_usage [bins]) -> centroids [K, bins, dim]."""
    _, bins, dim = shape
    sources = tuple(s for es, cu in keys for s in ((es, (bins, dim)), (cu, (bins,))))

    def combine(*arrays: np.ndarray) -> np.ndarray:
        pairs = zip(arrays[::2], arrays[1::2])
        return np.stack([es / np.maximum(cu, 1e-5)[:, None] for es, cu in pairs])

    return Entry(path, sources, combine)


def _layer_keys(fmt: str, prefix: str) -> dict[str, str]:
    if fmt == "hf":
        return {
            "in_ln": f"{prefix}.input_layernorm", "post_ln": f"{prefix}.post_attention_layernorm",
            "o": f"{prefix}.self_attn.o_proj.weight", "fc1": f"{prefix}.mlp.fc1.weight",
            "fc2": f"{prefix}.mlp.fc2.weight", "ls1": f"{prefix}.self_attn_layer_scale.scale",
            "ls2": f"{prefix}.mlp_layer_scale.scale",
        }
    return {
        "in_ln": f"{prefix}.norm1", "post_ln": f"{prefix}.norm2", "o": f"{prefix}.self_attn.out_proj.weight",
        "fc1": f"{prefix}.linear1.weight", "fc2": f"{prefix}.linear2.weight",
        "ls1": f"{prefix}.layer_scale_1.scale", "ls2": f"{prefix}.layer_scale_2.scale",
    }


def _entries(cfg: MimiConfig, fmt: str, shapes: Mapping[str, Shape]) -> Iterator[Entry]:
    """All entries for format `fmt` ("hf" or "moshi"); `shapes` are the Flax parameter shapes by path."""
    hf = fmt == "hf"
    for path, shape in shapes.items():
        parts = path.split("/")
        top = parts[0]
        if top in ("encoder", "decoder"):  # SEANet
            idx = parts[1].removeprefix("layers_")
            base = f"{top}.layers.{idx}" if hf else f"{top}.model.{idx}"
            if parts[2] in ("conv1", "conv2"):
                base += ".block.1" if parts[2] == "conv1" else ".block.3"
            leaf = "weight" if parts[-1] == "kernel" else "bias"
            if top == "decoder" and parts[2] not in ("conv1", "conv2") and int(idx) in convtr_indices(cfg):
                key = f"{base}.conv.{leaf}" if hf else f"{base}.convtr.convtr.{leaf}"
                yield _convtr(path, key, shape) if leaf == "weight" else same(path, key, shape)
            else:
                key = f"{base}.conv.{leaf}" if hf else f"{base}.conv.conv.{leaf}"
                yield _conv(path, key, shape) if leaf == "weight" else same(path, key, shape)
        elif top == "downsample":
            yield _conv(path, "downsample.conv.weight" if hf else "downsample.conv.conv.conv.weight", shape)
        elif top == "upsample":
            yield _convtr(path, "upsample.conv.weight" if hf else "upsample.convtr.convtr.convtr.weight", shape)
        elif top in ("encoder_transformer", "decoder_transformer"):
            yield from _transformer_entry(cfg, fmt, path, parts, shape)
        elif top == "quantizer":
            yield from _quantizer_entry(fmt, path, parts, shape)
        else:
            raise AssertionError(f"unmapped parameter {path}")


def _transformer_entry(cfg: MimiConfig, fmt: str, path: str, parts: list[str], shape: Shape) -> Iterator[Entry]:
    layer = parts[1].removeprefix("layers_")
    prefix = f"{parts[0]}.layers.{layer}" if fmt == "hf" else f"{parts[0]}.transformer.layers.{layer}"
    keys = _layer_keys(fmt, prefix)
    name = "/".join(parts[2:])
    if name in ("input_layernorm/scale", "input_layernorm/bias", "post_attention_layernorm/scale",
                "post_attention_layernorm/bias"):
        ln = keys["in_ln" if name.startswith("input") else "post_ln"]
        yield same(path, f"{ln}.{'weight' if name.endswith('scale') else 'bias'}", shape)
    elif name == "self_attn_layer_scale/scale":
        yield same(path, keys["ls1"], shape)
    elif name == "mlp_layer_scale/scale":
        yield same(path, keys["ls2"], shape)
    elif name in ("fc1/kernel", "fc2/kernel"):
        yield transposed(path, keys[name[:3]], shape)
    elif name == "self_attn/o_proj/kernel":
        yield transposed(path, keys["o"], shape)
    elif fmt == "hf":  # q/k/v_proj
        yield transposed(path, f"{prefix}.self_attn.{parts[3]}.weight", shape)
    else:  # moshi stacks q;k;v rows in one in_proj with interleaved RoPE pairs
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        rows = {"q_proj": (0, q, cfg.num_heads), "k_proj": (q, q + kv, cfg.num_kv_heads), "v_proj": (q + kv, q + 2 * kv, 0)}
        start, stop, heads = rows[parts[3]]

        def combine(w: np.ndarray, start: int = start, stop: int = stop, heads: int = heads) -> np.ndarray:
            w = w[start:stop]
            return (rope_interleaved_to_half(w, heads) if heads else w).T

        yield Entry(path, ((f"{prefix}.self_attn.in_proj_weight", (q + 2 * kv, cfg.hidden_size)),), combine)


def _quantizer_entry(fmt: str, path: str, parts: list[str], shape: Shape) -> Iterator[Entry]:
    half = parts[1]
    if fmt == "hf":
        base = f"quantizer.{half}_residual_vector_quantizer"
        layer = lambda j: (f"{base}.layers.{j}.codebook.embed_sum", f"{base}.layers.{j}.codebook.cluster_usage")  # noqa: E731
    else:
        base = "quantizer.rvq_first" if half == "semantic" else "quantizer.rvq_rest"
        layer = lambda j: (f"{base}.vq.layers.{j}._codebook.embedding_sum", f"{base}.vq.layers.{j}._codebook.cluster_usage")  # noqa: E731
    if parts[2] == "codebooks":
        yield _codebooks(path, [layer(j) for j in range(shape[0])], shape)
    else:
        yield _proj(path, f"{base}.{parts[2]}.weight", shape)


def _is_ignorable(key: str) -> bool:
    """Buffers with no inference role: the codebooks' `initialized` flags."""
    return key.endswith(("codebook.initialized", "_codebook._initialized"))


def detect_format(keys: set[str]) -> str:
    if "encoder.model.0.conv.conv.weight" in keys:
        return "moshi"
    if "encoder.layers.0.conv.weight" in keys:
        return "hf"
    raise CheckpointError(
        "not a Mimi checkpoint: expected 'encoder.layers.0.conv.weight' (transformers) or "
        "'encoder.model.0.conv.conv.weight' (moshi)"
    )


def abstract_params(cfg: MimiConfig) -> dict[str, Any]:
    """Parameter tree of ShapeDtypeStruct for `cfg`, without allocating."""
    from csm_jax.codec.mimi import Mimi

    frame = jnp.zeros((1, cfg.frame_size), jnp.float32)
    return jax.eval_shape(lambda: Mimi(cfg).init(jax.random.key(0), frame))["params"]


def convert_mimi(tensors: Mapping[str, np.ndarray], cfg: MimiConfig, fmt: str, source: str) -> dict[str, Any]:
    """File tensors (key -> numpy array) -> Flax Mimi params (float32), strictly (see `csm_jax.weights.convert`)."""
    flat_shapes = {
        "/".join(k): tuple(v.shape)
        for k, v in flax.traverse_util.flatten_dict(abstract_params(cfg)).items()
    }
    entries = _entries(cfg, fmt, flat_shapes)
    return convert(tensors, entries, source, f"Mimi config ({fmt} format)", _is_ignorable)
