"""CSM hyper-parameters: a Llama-style backbone and depth decoder, read from transformers or original configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Llama-3 RoPE scaling as torchtune's Llama3ScaledRoPE applies it in CSM: (factor, low_freq_factor,
# high_freq_factor, original_max_position_embeddings).
LLAMA3_ROPE = (32.0, 1.0, 4.0, 8192)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """One transformer stack (pre-RMSNorm, GQA attention with RoPE, SwiGLU MLP)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: tuple[float, float, float, int] | None = LLAMA3_ROPE
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        # transformers 5 writes `rope_parameters`; older configs a top-level `rope_theta` plus `rope_scaling`
        legacy = dict(d.get("rope_scaling") or {})
        legacy.setdefault("rope_type", legacy.pop("type", "default"))
        rope = d.get("rope_parameters") or {**legacy, "rope_theta": d.get("rope_theta", 500_000.0)}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        elif rope_type == "default":
            scaling = None
        else:
            raise ValueError(f"unsupported RoPE type {rope_type!r}")
        heads = d["num_attention_heads"]
        return cls(
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", 500_000.0)),
            rope_scaling=scaling,
            max_seq_len=d.get("max_position_embeddings", 2048),
        )


@dataclasses.dataclass(frozen=True)
class CsmConfig:
    """CSM: frames of `num_codebooks` audio columns plus one text column; audio vocab 2051 per codebook.

    `input_codebooks` (a csm-jax extension; None: all, as CSM-1B): how many codebooks of each audio row the backbone
    embeds. The depth decoder still predicts all `num_codebooks`. With fewer, the backbone conditions only on the
    codebooks it can trust in free running: the coarse ones, which the depth decoder reproduces well, rather than
    the fine ones, which it cannot (a small model trained on all of them leans on them and drifts once it hears
    its own). Training and generation both go through `Csm.embed`, so they see the same frames.

    `context_codebooks` (a csm-jax extension; None: as `input_codebooks`): how many codebooks of each *context*
    audio row (real audio before the turn being spoken: the prompt, earlier turns) the backbone embeds. Context
    codes are never the depth decoder's guesses, so a model may read all of them (the speaker's pitch and timbre
    live in the fine codebooks) while it reads only `input_codebooks` of the frames it speaks. The spoken rows are
    narrowed by `spoken_mask`: in training the target rows, in generation the frames fed back."""

    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32
    dtype: str = "float32"  # compute dtype; parameters are stored float32
    input_codebooks: int | None = None
    context_codebooks: int | None = None

    def __post_init__(self) -> None:
        if self.num_codebooks < 2:
            raise ValueError("CSM needs at least 2 codebooks")
        for name in ("input_codebooks", "context_codebooks"):
            m = getattr(self, name)
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.num_codebooks):
                raise ValueError(f"{name} must be null or an int in 1..{self.num_codebooks}, got {m!r}")
        if self.context_codebooks is not None and self.context_codebooks < self.backbone_codebooks:
            raise ValueError(f"context_codebooks ({self.context_codebooks}) must be at least input_codebooks "
                             f"({self.backbone_codebooks})")
        jnp.dtype(self.dtype)

    @property
    def backbone_codebooks(self) -> int:
        """Codebooks of each audio row the backbone embeds (`input_codebooks`, or all)."""
        return self.num_codebooks if self.input_codebooks is None else self.input_codebooks

    @property
    def embedded_codebooks(self) -> int:
        """Audio columns `Csm.embed` reads where the mask is set: `context_codebooks`, or `backbone_codebooks`."""
        return self.backbone_codebooks if self.context_codebooks is None else self.context_codebooks

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "CsmConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CsmConfig":
        d = dict(d)
        for key in ("backbone", "decoder"):
            sub = dict(d[key])
            if sub.get("rope_scaling") is not None:
                sub["rope_scaling"] = tuple(sub["rope_scaling"])
            d[key] = LlamaConfig(**sub)
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "CsmConfig":
        """From a transformers `CsmConfig` dict (`config.json` of `CsmForConditionalGeneration`)."""
        if d.get("model_type") != "csm":
            raise ValueError(f"not a CSM config: model_type={d.get('model_type')!r}")
        depth = dict(d["depth_decoder_config"])
        decoder = LlamaConfig.from_hf(depth)
        return cls(
            backbone=LlamaConfig.from_hf(d),
            decoder=dataclasses.replace(decoder, max_seq_len=depth.get("max_position_embeddings", 33)),
            text_vocab_size=d.get("text_vocab_size", 128_256),
            audio_vocab_size=d.get("vocab_size", 2051),
            num_codebooks=d.get("num_codebooks", 32),
            input_codebooks=d.get("input_codebooks"),
            context_codebooks=d.get("context_codebooks"),
        )

    @classmethod
    def from_original(cls, d: dict[str, Any]) -> "CsmConfig":
        """From the original Sesame `config.json` (`ModelArgs`: backbone/decoder flavours and vocab sizes)."""
        flavors = {"llama-1B": csm_1b_backbone, "llama-100M": csm_1b_decoder}
        try:
            backbone, decoder = flavors[d["backbone_flavor"]](), flavors[d["decoder_flavor"]]()
        except KeyError as e:
            raise ValueError(f"unknown CSM flavour {e}; known: {sorted(flavors)}") from e
        return cls(backbone=backbone, decoder=decoder, text_vocab_size=d["text_vocab_size"],
                   audio_vocab_size=d["audio_vocab_size"], num_codebooks=d["audio_num_codebooks"])


def csm_1b_backbone() -> LlamaConfig:
    """torchtune llama3_2 1B as CSM builds it (`llama-1B`)."""
    return LlamaConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                       intermediate_size=8192)


def csm_1b_decoder() -> LlamaConfig:
    """The depth decoder (`llama-100M`)."""
    return LlamaConfig(hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=128,
                       intermediate_size=8192)


def csm_1b() -> CsmConfig:
    """Sesame CSM-1B."""
    return CsmConfig(backbone=csm_1b_backbone(), decoder=csm_1b_decoder())
