"""Write a codec as a transformers Mimi directory (`config.json` + `model.safetensors`, flat checkpoint keys, plain
weights, no weight norm) that `transformers.MimiModel.from_pretrained` and `load_codec` read.

The tensors are the inverse of the loader's mapping (`csm_jax.codec.weights`, transformers format): each entry
only moves elements, so `csm_jax.weights.invert` undoes it. Codebooks are written
in the official EMA form: `embed_sum` [bins, dim], `cluster_usage` [bins] and `initialized` [1] per level, with
centroid = embed_sum / max(cluster_usage, 1e-5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.traverse_util
import numpy as np
from safetensors.numpy import save_file

from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.weights import _entries
from csm_jax.weights import invert

EPS = 1e-5  # transformers' MimiEuclideanCodebook.epsilon
HALVES = ("semantic", "acoustic")
EMA_ATOL, EMA_RTOL = 1e-6, 1e-5  # EMA centroids vs the codec's codebooks (both float32)


def transformers_config(cfg: MimiConfig) -> dict[str, Any]:
    """The transformers `MimiConfig` dict (config.json) of `cfg`; ValueError for what transformers cannot build."""
    if cfg.latent_stride == 1:
        raise ValueError(
            f"frame_rate={cfg.frame_rate} equals the encoder rate: transformers' Mimi then has no down/upsampling "
            "layers, which this codec has"
        )
    hf_stride = int(math.ceil(cfg.sample_rate / cfg.hop_length) / cfg.frame_rate)  # transformers' latent_stride
    if hf_stride != cfg.latent_stride:
        raise ValueError(
            f"transformers derives latent stride int(ceil({cfg.sample_rate} / {cfg.hop_length}) / {cfg.frame_rate}) "
            f"= {hf_stride}, not this codec's {cfg.latent_stride}"
        )
    if cfg.codebook_size & (cfg.codebook_size - 1):
        raise ValueError(f"transformers' Mimi needs a power-of-2 codebook_size, got {cfg.codebook_size}")
    if cfg.channels not in (1, 2):
        raise ValueError(f"transformers' Mimi takes 1 or 2 audio channels, got {cfg.channels}")
    return {
        "model_type": "mimi",
        "architectures": ["MimiModel"],
        "dtype": "float32",
        "sampling_rate": cfg.sample_rate,
        "frame_rate": cfg.frame_rate,
        "audio_channels": cfg.channels,
        "hidden_size": cfg.hidden_size,
        "num_filters": cfg.num_filters,
        "num_residual_layers": cfg.num_residual_layers,
        "upsampling_ratios": list(cfg.ratios),
        "kernel_size": cfg.kernel_size,
        "residual_kernel_size": cfg.residual_kernel_size,
        "last_kernel_size": cfg.last_kernel_size,
        "dilation_growth_rate": cfg.dilation_base,
        "compress": cfg.compress,
        "pad_mode": cfg.pad_mode,
        "use_causal_conv": True,
        "use_conv_shortcut": False,
        "trim_right_ratio": 1.0,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "attention_bias": False,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "codebook_size": cfg.codebook_size,
        "codebook_dim": cfg.codebook_dim,
        "vector_quantization_hidden_dimension": cfg.codebook_dim,
        "num_quantizers": cfg.num_quantizers,
        "num_semantic_quantizers": cfg.num_semantic_quantizers,
        "upsample_groups": cfg.upsample_groups,
        "use_cache": False,
        "use_streaming": False,
    }


def _ema_state(books: np.ndarray, ema_half: Any, half: str) -> tuple[np.ndarray, np.ndarray]:
    """(embed_sum float32 [K, bins, dim], cluster_usage float32 [K, bins]) for codebooks [K, bins, dim]."""
    if ema_half is None:
        return books, np.ones(books.shape[:2], np.float32)
    if not isinstance(ema_half, Mapping) or {"embed_sum", "cluster_usage"} - set(ema_half):
        raise ValueError(f"ema[{half!r}] must be a mapping with 'embed_sum' and 'cluster_usage'")
    embed_sum = np.asarray(ema_half["embed_sum"], np.float32)
    usage = np.asarray(ema_half["cluster_usage"], np.float32)
    if embed_sum.shape != books.shape or usage.shape != books.shape[:2]:
        raise ValueError(
            f"ema[{half!r}]: embed_sum {list(embed_sum.shape)} / cluster_usage {list(usage.shape)} do not fit "
            f"codebooks {list(books.shape)}"
        )
    centroids = embed_sum / np.maximum(usage, EPS)[..., None]
    if not np.allclose(centroids, books, rtol=EMA_RTOL, atol=EMA_ATOL):
        diff = float(np.max(np.abs(centroids - books)))
        raise ValueError(
            f"ema[{half!r}] centroids (embed_sum / cluster_usage) differ from the codec's codebooks by up to "
            f"{diff:.3g}: pass the EMA state the codec's codebooks were made from"
        )
    return embed_sum, usage


def transformers_tensors(
    params: Any, cfg: MimiConfig, ema: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Mimi params -> transformers checkpoint tensors (key -> float32 array in torch layout).

    `ema` (optional): per half ("semantic"/"acoustic") {"embed_sum": [K, bins, dim], "cluster_usage": [K, bins]}
    written instead of (codebooks, usage 1); its centroids must equal the codebooks. A training state's global
    "initialized" flag may be present and is not used (each level's `initialized` is written as 1).
    """
    if ema is not None and set(ema) - {"initialized"} != set(HALVES):
        raise ValueError(f"ema must have the keys {list(HALVES)} (and optionally 'initialized'), got {sorted(ema)}")
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(params).items()}
    out: dict[str, np.ndarray] = {}
    for entry in _entries(cfg, "hf", {path: value.shape for path, value in flat.items()}):
        if not entry.path.endswith("/codebooks"):
            out.update(invert(entry, flat[entry.path]))
            continue
        half = entry.path.split("/")[1]
        embed_sum, usage = _ema_state(flat[entry.path], None if ema is None else ema[half], half)
        for j, ((sum_key, _), (usage_key, _)) in enumerate(zip(entry.sources[::2], entry.sources[1::2])):
            out[sum_key], out[usage_key] = embed_sum[j], usage[j]
            out[sum_key.removesuffix("embed_sum") + "initialized"] = np.ones((1,), np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_transformers(codec: MimiCodec, out_dir: str | Path, ema: Mapping[str, Any] | None = None) -> Path:
    """Write `codec` to the new (or empty) directory `out_dir` as a transformers Mimi model; returns its path.

    `ema`: optional quantizer EMA state, per half {"embed_sum": [K, bins, dim], "cluster_usage": [K, bins]}
    (as in training), exported instead of the effective centroids with usage 1. Everything is checked before
    anything is written.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; refusing to overwrite")
    config = transformers_config(codec.config)
    tensors = transformers_tensors(codec.params, codec.config, ema)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
