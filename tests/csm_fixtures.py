"""Shared helpers and session fixtures for the CSM (backbone + depth decoder) parity tests.

The oracle is transformers' `CsmForConditionalGeneration` (eager attention, fp32) with seeded random weights,
written by `save_pretrained`. Shapes:

- `tiny`: the spec §5 recipe (K=4 codebooks of 17, backbone 64 wide with 4/2 heads, depth decoder 32 wide).
- `wide`: K=6, backbone 96 wide with 6/2 heads (head_dim 16, 3 layers), depth decoder 64 wide with 4/1 heads.
- `rope`: K=8, multi-head (no GQA) backbone, llama3 RoPE parameters whose wavelength thresholds (8..32 positions
  in the backbone, 2..8 in the depth decoder) fall inside the tested sequence lengths, so a port that ignores or
  hard-codes the config's `rope_parameters` fails. The other shapes use the CSM-1B constants (theta 5e5, factor
  32, low 1, high 4, original 8192), whose scaling only touches frequencies that barely rotate over 20 positions.
- `full` (marked `full_size`): `CsmConfig()` defaults (CSM-1B architecture) with the llama3 RoPE parameters of
  the hub checkpoint's `config.json`. ~1.65 G parameters, 6.6 GB fp32: the reference outputs are computed and
  the directory written, then the torch model is freed before the port loads it.

The transformers defaults (std 0.02 everywhere, RMSNorm weights 1) give nearly flat logits and would hide layout
mistakes, so `randomize_csm_` redraws every backbone / depth-decoder / head weight: linear weights and the
codebook heads ~ N(0, 1/fan_in), embeddings ~ N(0, 1), RMSNorm weights ~ U(0.5, 1.5). The Mimi codec inside the
checkpoint keeps transformers' init (these tests never run it).

Reference outputs are computed from the transformers modules exactly as the port's API defines them:
- backbone: the input row is the masked sum of the 33 (K+1) column embeddings (text column via
  `embed_text_tokens`, audio column k via `embed_audio_tokens` row `code + k * vocab`), run through
  `backbone_model(inputs_embeds=..., position_ids=arange)`; hidden = `last_hidden_state` (post final norm),
  c0 logits = `lm_head(hidden)`. For text-only and audio-only rows this equals transformers' own
  `forward(input_ids=[B, S])` / `forward(input_ids=[B, S, K])` paths (checked by a test).
- depth decoder: `depth_decoder(input_ids=[0, c0, .., c_{K-2}], backbone_last_hidden_state=h)`: position 0 is a
  placeholder replaced by h, position p >= 1 embeds `c_{p-1} + (p-1) * vocab`; `logits` (positions 1..K-1,
  codebook head p-1) = [B, K-1, vocab], row i-1 = codebook i.

Test modules import the fixtures with `from csm_fixtures import ...`; expensive objects are memoised at module
level (`_CACHE`) so each reference / loaded port is built once per session.
"""

from __future__ import annotations

import gc
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CsmConfig as HFCsmConfig
from transformers import CsmDepthDecoderConfig, CsmForConditionalGeneration, MimiConfig
from transformers.models.csm.modeling_csm import CsmCodebooksHead, CsmRMSNorm

# ------------------------------------------------------------------------------------------ configs ---
# CSM-1B RoPE constants in torchtune's form (spec §1.2 / §5)
ROPE_CSM = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The same scaling as written by convert_csm.py into the hub config.json (spec §2.2; algebraically equal)
ROPE_HUB_BACKBONE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
                     "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}
ROPE_HUB_DEPTH = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.001953125,
                  "high_freq_factor": 0.0078125, "original_max_position_embeddings": 16}
# Scaling that bites at short range: kept below 8 positions, /8 above 32, smoothed in between (backbone) ...
ROPE_SHORT_BACKBONE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# ... and kept below 2, /4 above 8 (depth decoder, positions 0..K-1)
ROPE_SHORT_DEPTH = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

TINY_MIMI: dict[str, Any] = dict(
    hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, codebook_dim=8, vector_quantization_hidden_dimension=8, num_quantizers=4,
    codebook_size=16, upsample_groups=16, sliding_window=6,
)
NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, audio_token_id=None, audio_eos_token_id=None)


@dataclass(frozen=True)
class Shape:
    name: str
    backbone: dict[str, Any]
    depth: dict[str, Any]
    seq_len: int  # S of the parity inputs (B = 2)
    seed: int


SHAPES: dict[str, Shape] = {
    "tiny": Shape(
        "tiny",
        backbone=dict(num_codebooks=4, vocab_size=17, text_vocab_size=50, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters=ROPE_CSM),
        depth=dict(num_codebooks=4, backbone_hidden_size=64, vocab_size=17, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=5,
                   rope_parameters=ROPE_CSM),
        seq_len=16,
        seed=11,
    ),
    "wide": Shape(
        "wide",
        backbone=dict(num_codebooks=6, vocab_size=23, text_vocab_size=70, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters=ROPE_CSM),
        depth=dict(num_codebooks=6, backbone_hidden_size=96, vocab_size=23, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=7,
                   rope_parameters=ROPE_CSM),
        seq_len=13,
        seed=22,
    ),
    "rope": Shape(
        "rope",
        backbone=dict(num_codebooks=8, vocab_size=13, text_vocab_size=40, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      rope_parameters=ROPE_SHORT_BACKBONE),
        depth=dict(num_codebooks=8, backbone_hidden_size=64, vocab_size=13, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=9,
                   rope_parameters=ROPE_SHORT_DEPTH),
        seq_len=24,
        seed=33,
    ),
}
TINY_SHAPES = tuple(SHAPES)
FULL_SEQ_LEN = 8
BATCH = 2

_CACHE: dict[Any, Any] = {}


def _memo(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def max_abs_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def hf_config(shape: str) -> HFCsmConfig:
    """The transformers config of a named shape (`full`: CsmConfig() defaults with the hub's llama3 RoPE)."""
    if shape == "full":
        depth = CsmDepthDecoderConfig(rope_parameters=ROPE_HUB_DEPTH)
        return HFCsmConfig(rope_parameters=ROPE_HUB_BACKBONE, depth_decoder_config=depth, attn_implementation="eager")
    s = SHAPES[shape]
    depth = CsmDepthDecoderConfig(**s.depth)
    return HFCsmConfig(**s.backbone, **NO_SPECIAL_TOKENS, depth_decoder_config=depth,
                       codec_config=MimiConfig(**TINY_MIMI), attn_implementation="eager")


# ------------------------------------------------------------------------------------ HF reference ---
def randomize_csm_(model: CsmForConditionalGeneration, seed: int) -> None:
    """Redraw every backbone / depth-decoder / head weight in place (the codec is left alone).

    Linear weights and the codebook heads ~ N(0, 1/fan_in) (attention logits and output logits of order 1),
    embeddings ~ N(0, 1), RMSNorm weights ~ U(0.5, 1.5). The tied audio embedding is one tensor shared by the
    backbone and the depth decoder, so it is drawn once.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("codec_model"):
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or id(weight) in seen:
                continue
            seen.add(id(weight))
            if isinstance(module, torch.nn.Linear):
                assert module.bias is None, name
                weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[1]), generator=gen)
            elif isinstance(module, torch.nn.Embedding):
                weight.normal_(0.0, 1.0, generator=gen)
            elif isinstance(module, CsmRMSNorm):
                weight.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(module, CsmCodebooksHead):  # [K-1, hidden, vocab], used as h @ W
                weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[1]), generator=gen)
            else:
                raise AssertionError(f"unexpected weighted module {name}: {type(module).__name__}")


def audio_embedding_is_tied(model: CsmForConditionalGeneration) -> bool:
    a = model.backbone_model.embed_tokens.embed_audio_tokens.weight
    b = model.depth_decoder.model.embed_tokens.weight
    return a.data_ptr() == b.data_ptr()


def reference_backbone(model: CsmForConditionalGeneration, tokens: np.ndarray, mask: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """tokens int [B, S, K+1], mask bool [B, S, K+1] -> (c0 logits float32 [B, S, vocab], hidden [B, S, D])."""
    cfg = model.config
    k, vocab = cfg.num_codebooks, cfg.vocab_size
    b, s, width = tokens.shape
    assert width == k + 1 and mask.shape == tokens.shape
    t = torch.from_numpy(np.asarray(tokens, np.int64))
    m = torch.from_numpy(np.asarray(mask, bool)).to(torch.float32)
    with torch.no_grad():
        audio = model.backbone_model.embed_tokens.embed_audio_tokens(t[..., :k] + torch.arange(k) * vocab)
        text = model.embed_text_tokens(t[..., k])
        embeds = torch.cat([audio, text[:, :, None]], dim=2)  # [B, S, K+1, D], the original's column order
        embeds = (embeds * m[..., None]).sum(dim=2)
        positions = torch.arange(s)[None].expand(b, s)
        hidden = model.backbone_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)
    return logits.float().numpy(), hidden.float().numpy()


def reference_depth(model: CsmForConditionalGeneration, last_hidden: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """last_hidden float [B, D], codes int [B, K] -> teacher-forced logits float32 [B, K-1, vocab]."""
    k = model.config.num_codebooks
    assert codes.shape[1] == k
    c = torch.from_numpy(np.asarray(codes, np.int64))
    ids = torch.cat([torch.zeros_like(c[:, :1]), c[:, : k - 1]], dim=1)  # position 0 = placeholder
    with torch.no_grad():
        # use_cache must stay on: with use_cache=False transformers 5.23 passes 1-D position_ids to
        # create_causal_mask, which fails (IndexError in find_packed_sequence_indices)
        out = model.depth_decoder(input_ids=ids, backbone_last_hidden_state=torch.from_numpy(last_hidden))
    assert out.logits.shape == (codes.shape[0], k - 1, model.config.vocab_size)
    return out.logits.float().numpy()


def hf_forward_logits(model: CsmForConditionalGeneration, input_ids: np.ndarray) -> np.ndarray:
    """transformers' own `forward`: input_ids [B, S] (text tokens) or [B, S, K] (audio frames) -> c0 logits."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)), use_cache=False)
    return out.logits.float().numpy()


# -------------------------------------------------------------------------------------------- inputs ---
def make_tokens(cfg: HFCsmConfig, batch: int, seq_len: int, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (tokens int32 [B, S, K+1], mask bool [B, S, K+1]).

    Every column holds a random in-range id, masked or not (masked ids must not matter). kinds:
    - `mixed`: each row is text-only (mask on column K) or audio-only (mask on 0..K-1), both present per item;
    - `text` / `audio`: all rows of that kind;
    - `random`: every column masked independently (p = 0.5), at least one column per row.
    """
    k, vocab, text_vocab = cfg.num_codebooks, cfg.vocab_size, cfg.text_vocab_size
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([rng.integers(0, vocab, (batch, seq_len, k)),
                             rng.integers(0, text_vocab, (batch, seq_len, 1))], axis=-1).astype(np.int32)
    if kind == "random":
        mask = rng.random((batch, seq_len, k + 1)) < 0.5
        mask[~mask.any(-1), k] = True
        return tokens, mask
    if kind == "mixed":
        is_text = rng.random((batch, seq_len)) < 0.5
        is_text[:, 0], is_text[:, -1] = True, False  # both kinds in every item
    else:
        assert kind in ("text", "audio"), kind
        is_text = np.full((batch, seq_len), kind == "text")
    mask = np.zeros((batch, seq_len, k + 1), bool)
    mask[..., :k] = ~is_text[..., None]
    mask[..., k] = is_text
    return tokens, mask


@dataclass
class BackboneCase:
    tokens: np.ndarray  # int32 [B, S, K+1]
    mask: np.ndarray  # bool [B, S, K+1]
    c0_logits: np.ndarray  # float32 [B, S, vocab]
    hidden: np.ndarray  # float32 [B, S, D]


@dataclass
class DepthCase:
    last_hidden: np.ndarray  # float32 [B, D]: backbone hidden states (post final norm) of the mixed case
    codes: np.ndarray  # int32 [B, K]
    logits: np.ndarray  # float32 [B, K-1, vocab]


@dataclass
class CsmReference:
    """A transformers CSM with seeded random weights, written by `save_pretrained`, and its outputs."""

    shape: str
    config: HFCsmConfig
    hf_dir: Path
    saved_keys: tuple[str, ...]
    model: CsmForConditionalGeneration | None  # None for `full` (freed once the outputs exist)
    backbone: dict[str, BackboneCase] = field(default_factory=dict)
    depth: DepthCase | None = None


BACKBONE_KINDS = ("mixed", "random", "text", "audio")


def _compute_cases(model: CsmForConditionalGeneration, shape: str, batch: int, seq_len: int, seed: int,
                   kinds: tuple[str, ...]) -> tuple[dict[str, BackboneCase], DepthCase]:
    cfg = model.config
    cases = {}
    for i, kind in enumerate(kinds):
        tokens, mask = make_tokens(cfg, batch, seq_len, kind, seed + 100 * i)
        logits, hidden = reference_backbone(model, tokens, mask)
        cases[kind] = BackboneCase(tokens, mask, logits, hidden)
    # depth decoder inputs: post-norm backbone states at the last and a middle position of the mixed case
    hidden = cases["mixed"].hidden
    last_hidden = np.concatenate([hidden[:, -1], hidden[:, seq_len // 2]], axis=0)
    rng = np.random.default_rng(seed + 7)
    codes = rng.integers(0, cfg.vocab_size, (last_hidden.shape[0], cfg.num_codebooks)).astype(np.int32)
    depth = DepthCase(last_hidden, codes, reference_depth(model, last_hidden, codes))
    return cases, depth


def saved_keys(hf_dir: Path) -> tuple[str, ...]:
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        return tuple(sorted(f.keys()))


def build_reference(shape: str, root: Path) -> CsmReference:
    s = SHAPES[shape]
    torch.manual_seed(s.seed)
    model = CsmForConditionalGeneration(hf_config(shape)).eval()
    randomize_csm_(model, seed=s.seed + 1)
    assert audio_embedding_is_tied(model)
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    cases, depth = _compute_cases(model, shape, BATCH, s.seq_len, s.seed, BACKBONE_KINDS)
    return CsmReference(shape, model.config, hf_dir, saved_keys(hf_dir), model, cases, depth)


def build_full_reference(root: Path) -> CsmReference:
    """CSM-1B-sized reference. Peak RAM is the torch model (6.6 GB) plus what save_pretrained copies."""
    torch.manual_seed(1)
    model = CsmForConditionalGeneration(hf_config("full")).eval()
    randomize_csm_(model, seed=2)
    assert audio_embedding_is_tied(model)
    cases, depth = _compute_cases(model, "full", 1, FULL_SEQ_LEN, 5, ("mixed",))
    config = model.config
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    del model
    gc.collect()
    return CsmReference("full", config, hf_dir, saved_keys(hf_dir), None, cases, depth)


def get_reference(shape: str, tmp_path_factory: pytest.TempPathFactory) -> CsmReference:
    if shape == "full":
        return _memo(("ref", shape), lambda: build_full_reference(tmp_path_factory.mktemp("csm_full")))
    return _memo(("ref", shape), lambda: build_reference(shape, tmp_path_factory.mktemp(f"csm_{shape}")))


# ---------------------------------------------------------------------------------------- variants ---
AUDIO_KEY_BACKBONE = "backbone_model.embed_tokens.embed_audio_tokens.weight"
AUDIO_KEY_DEPTH = "depth_decoder.model.embed_tokens.weight"
AUDIO_KEY_VARIANTS = ("depth_only", "backbone_only", "both")


def write_audio_key_variant(ref: CsmReference, variant: str, root: Path) -> Path:
    """A copy of the reference directory whose tied audio embedding is stored under a different key.

    `depth_only`: as written by transformers 5.23 (the reference directory itself); `backbone_only`: renamed to
    the backbone key; `both`: stored under both keys (two copies, as pre-tying checkpoints hold it).
    """
    if variant == "depth_only":
        return ref.hf_dir
    out = root / variant
    out.mkdir()
    for f in ref.hf_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(ref.hf_dir / "model.safetensors"))
    audio = tensors.pop(AUDIO_KEY_DEPTH)
    tensors[AUDIO_KEY_BACKBONE] = audio
    if variant == "both":
        tensors[AUDIO_KEY_DEPTH] = audio.clone()
    else:
        assert variant == "backbone_only", variant
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# -------------------------------------------------------------------------------------------- port ---
@dataclass
class Port:
    """csm_jax's CSM loaded from a directory, with jitted entry points that return numpy arrays."""

    model: Any
    params: Any
    config: Any
    _fns: dict[str, Callable] = field(default_factory=dict, repr=False)

    def _fn(self, method: str) -> Callable:
        if method not in self._fns:
            import jax

            from csm_jax.csm import Csm

            m = getattr(Csm, method)
            self._fns[method] = jax.jit(lambda p, *a: self.model.apply({"params": p}, *a, method=m))
        return self._fns[method]

    def backbone(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import jax.numpy as jnp

        logits, hidden = self._fn("backbone_forward")(self.params, jnp.asarray(tokens, jnp.int32),
                                                      jnp.asarray(mask, bool))
        return np.asarray(logits), np.asarray(hidden)

    def depth(self, last_hidden: np.ndarray, codes: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        return np.asarray(self._fn("depth_forward")(self.params, jnp.asarray(last_hidden, jnp.float32),
                                                    jnp.asarray(codes, jnp.int32)))


def load_port(path: Path) -> Port:
    from csm_jax.csm import Csm, load_csm_params  # imported lazily: the reference side runs without it

    params, cfg = load_csm_params(path)
    return Port(Csm(cfg), params, cfg)


def variant_dir(shape: str, variant: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference directory of `shape` with its audio embedding stored as `variant` (written once)."""

    def write() -> Path:
        ref = get_reference(shape, tmp_path_factory)
        root = _memo(("variant_root", shape), lambda: tmp_path_factory.mktemp(f"csm_{shape}_variants"))
        return write_audio_key_variant(ref, variant, root)

    return _memo(("variant", shape, variant), write)


def get_port(shape: str, tmp_path_factory: pytest.TempPathFactory, variant: str = "depth_only") -> Port:
    return _memo(("port", shape, variant), lambda: load_port(variant_dir(shape, variant, tmp_path_factory)))


def release_full_reference() -> None:
    """Delete the full-size checkpoint directory (6.6 GB) and forget the full reference."""
    ref = _CACHE.pop(("ref", "full"), None)
    if ref is not None:
        shutil.rmtree(ref.hf_dir, ignore_errors=True)


# -------------------------------------------------------------------------------------------- fixtures ---
@pytest.fixture(scope="session", params=TINY_SHAPES)
def shape(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def csm_ref(shape: str, tmp_path_factory: pytest.TempPathFactory) -> CsmReference:
    return get_reference(shape, tmp_path_factory)


@pytest.fixture(scope="session")
def csm_port(shape: str, tmp_path_factory: pytest.TempPathFactory) -> Port:
    return get_port(shape, tmp_path_factory)
