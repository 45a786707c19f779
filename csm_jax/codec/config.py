"""Mimi codec hyper-parameters, readable from a transformers `config.json`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MimiConfig:
    """Architecture of the Mimi codec. Defaults are the official 24 kHz / 12.5 Hz / 32-codebook model."""

    sample_rate: int = 24_000
    frame_rate: float = 12.5
    channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses the reverse
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    pad_mode: str = "constant"
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    sliding_window: int = 250
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self) -> None:
        if self.pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {self.pad_mode!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not 1 <= self.num_semantic_quantizers < self.num_quantizers:
            raise ValueError("need 1 <= num_semantic_quantizers < num_quantizers")
        if self.upsample_groups not in (1, self.hidden_size):
            raise ValueError(
                f"upsample_groups must be 1 or hidden_size={self.hidden_size} (depthwise), got {self.upsample_groups}"
            )
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def hop_length(self) -> int:
        """Samples per encoder step (product of the SEANet strides)."""
        return math.prod(self.ratios)

    @property
    def latent_stride(self) -> int:
        """Encoder steps per codec frame (the learnt down/upsampling stride)."""
        stride = self.sample_rate / self.hop_length / self.frame_rate
        if stride != int(stride):
            raise ValueError(f"encoder rate {self.sample_rate / self.hop_length} Hz is not a multiple of {self.frame_rate} Hz")
        return int(stride)

    @property
    def frame_size(self) -> int:
        """Samples per codec frame: 1920 for the official model."""
        return self.hop_length * self.latent_stride

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "MimiConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MimiConfig":
        """Build from `to_dict()` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MimiConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "ratios" in d:
            d["ratios"] = tuple(d["ratios"])
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MimiConfig":
        """Build from a transformers `MimiConfig` dict (`config.json` of a Mimi model)."""
        if d.get("model_type", "mimi") != "mimi":
            raise ValueError(f"not a Mimi config: model_type={d.get('model_type')!r}")
        if not d.get("use_causal_conv", True) or d.get("use_conv_shortcut", False):
            raise ValueError("only causal Mimi without conv shortcuts is supported")
        if d.get("trim_right_ratio", 1.0) != 1.0:
            raise ValueError("only trim_right_ratio=1.0 is supported")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported Mimi RoPE type {rope.get('rope_type')!r}")
        hidden = d.get("hidden_size", 512)
        if d.get("vector_quantization_hidden_dimension", d.get("codebook_dim", 256)) != d.get("codebook_dim", 256):
            raise ValueError("vector_quantization_hidden_dimension must equal codebook_dim")
        heads = d.get("num_attention_heads", 8)
        return cls(
            sample_rate=d.get("sampling_rate", 24_000),
            frame_rate=d.get("_frame_rate") or d.get("frame_rate") or 12.5,
            channels=d.get("audio_channels", 1),
            hidden_size=hidden,
            num_filters=d.get("num_filters", 64),
            num_residual_layers=d.get("num_residual_layers", 1),
            ratios=tuple(d.get("upsampling_ratios", (8, 6, 5, 4))),
            kernel_size=d.get("kernel_size", 7),
            residual_kernel_size=d.get("residual_kernel_size", 3),
            last_kernel_size=d.get("last_kernel_size", 3),
            dilation_base=d.get("dilation_growth_rate", 2),
            compress=d.get("compress", 2),
            pad_mode=d.get("pad_mode", "constant"),
            num_layers=d.get("num_hidden_layers", 8),
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=d.get("intermediate_size", 2048),
            norm_eps=d.get("norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10_000.0)),
            sliding_window=d.get("sliding_window", 250),
            codebook_size=d.get("codebook_size", 2048),
            codebook_dim=d.get("codebook_dim", 256),
            num_quantizers=d.get("num_quantizers", 32),
            num_semantic_quantizers=d.get("num_semantic_quantizers", 1),
            upsample_groups=d.get("upsample_groups", hidden),
        )
