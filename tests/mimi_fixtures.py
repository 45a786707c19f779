"""Shared helpers and session fixtures for the Mimi codec tests.

The oracle is transformers' `MimiModel` with seeded random weights, in two sizes: TINY (hidden 16, 4 codebooks
of 16 entries, attention window 6) and FULL (the default, official architecture). Each reference is written
twice: `save_pretrained` (transformers format) and a moshi-format `.safetensors` file produced by
`hf_to_moshi`, an inverse key mapping written here independently of csm_jax.

Test modules import the fixtures with `from mimi_fixtures import ...`. Pytest registers an imported fixture
once per importing module, so the expensive objects are memoised at module level (`_CACHE`): each reference
model and each loaded codec is built once per session, whichever module asks first.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from transformers import MimiConfig as HFMimiConfig
from transformers import MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiEuclideanCodebook,
    MimiLayerScale,
)

import csm_jax

DATA = Path(__file__).parent / "data"
FRAME = 1920  # samples per codec frame at 24 kHz / 12.5 Hz

TINY_KWARGS: dict[str, Any] = dict(
    hidden_size=16,
    num_filters=4,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    codebook_dim=8,
    vector_quantization_hidden_dimension=8,
    num_quantizers=4,
    codebook_size=16,
    upsample_groups=16,
    sliding_window=6,
)
SIZES = (pytest.param("tiny", id="tiny"), pytest.param("full", id="full", marks=pytest.mark.full_size))
TARGET_PEAK = 0.8  # decoded speech is rescaled to this peak (real Mimi output is in 0.5..1)

_CACHE: dict[Any, Any] = {}


def _memo(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


# --------------------------------------------------------------------------------------------- audio ---
def clip(name: str) -> np.ndarray:
    """A committed test clip (`speech_1s`, `speech_3s`, `speech_14s`) as float32 [N] at 24 kHz."""

    def load() -> np.ndarray:
        audio, rate = sf.read(DATA / f"{name}.wav", dtype="float32")
        assert rate == 24_000 and audio.ndim == 1, (name, rate, audio.shape)
        return audio

    return _memo(("clip", name), load).copy()


def trim_to_frames(audio: np.ndarray, frames: int | None = None) -> np.ndarray:
    """Cut [..., N] to a whole number of 1920-sample frames (all whole frames, or the first `frames`)."""
    n = audio.shape[-1] // FRAME if frames is None else frames
    assert n * FRAME <= audio.shape[-1]
    return np.ascontiguousarray(audio[..., : n * FRAME])


def three_signals(num_samples: int) -> np.ndarray:
    """Three different speech-like signals of equal length, float32 [3, num_samples] (from the 14 s clip)."""
    x = clip("speech_14s")
    assert num_samples <= len(x)
    sigs = [x[:num_samples], 0.7 * x[::-1][:num_samples], 0.9 * np.roll(x, 77_777)[:num_samples]]
    return np.stack(sigs).astype(np.float32)


def frac_equal(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.mean(a == b))


def max_abs_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


# ------------------------------------------------------------------------------------ HF reference ---
def randomize_mimi_(model: MimiModel, seed: int) -> None:
    """Give every parameter and buffer a value that matters, in place.

    transformers' own init leaves the codebooks at zero (everything maps to code 0), the layer scales at 0.01
    and the linear layers at std 0.02 (near-uniform attention), which would hide mapping mistakes. Here:
    codebook `embed_sum` ~ N(0, 1), `cluster_usage` ~ U(0.5, 2); layer scales ~ U(0.2, 1); linear weights
    ~ N(0, 1/fan_in) (attention logits of order 1, so RoPE order matters); layer-norm weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.1). Convolutions keep transformers' seeded Kaiming init.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MimiEuclideanCodebook):
                module.embed_sum.copy_(torch.randn(module.embed_sum.shape, generator=gen))
                module.cluster_usage.copy_(0.5 + 1.5 * torch.rand(module.cluster_usage.shape, generator=gen))
                module._embed = None  # drop the cached centroids
            elif isinstance(module, MimiLayerScale):
                module.scale.copy_(0.2 + 0.8 * torch.rand(module.scale.shape, generator=gen))
            elif isinstance(module, torch.nn.Linear):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def calibrate_(model: MimiModel) -> float:
    """Fit the random model to speech, in place; returns the decoded peak before the output rescale.

    1. Make each quantizer `input_proj` blind to the latent's mean over time (its slowly varying part
       dominates the random encoder's output) and scale it so the projected latent of speech has unit std,
       like the N(0, 1) codebooks; otherwise every frame picks one of the same few centroids.
    2. Scale the decoder's last conv (weight and bias) so decoded speech peaks at TARGET_PEAK.
    """
    x = torch.from_numpy(clip("speech_1s"))[None, None]
    last = model.decoder.decoder_seanet.layers[-1]
    assert isinstance(last, MimiConv1d) and last.conv.out_channels == 1
    with torch.no_grad():
        latent = model.encoder(x).latents
        q = model.quantizer
        for rvq in (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer):
            w = rvq.input_proj.weight  # [codebook_dim, hidden, 1]
            mean = latent.mean(dim=(0, 2))
            mean = mean / mean.norm()
            w[:, :, 0] -= (w[:, :, 0] @ mean)[:, None] * mean[None, :]
            w.div_(rvq.input_proj(latent).std())
        peak = float(model.decode(model.encode(x).audio_codes).audio_values.abs().max())
        last.conv.weight.mul_(TARGET_PEAK / peak)
        last.conv.bias.mul_(TARGET_PEAK / peak)
    return peak


def _permute_rotate_half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of the HF conversion `W.view(H, D//2, 2, in).transpose(1, 2)`: rotate-half rows -> interleaved."""
    out, inp = w.shape
    head_dim = out // num_heads
    return w.view(num_heads, 2, head_dim // 2, inp).transpose(1, 2).reshape(out, inp)


CODEBOOK_BUFFERS = {"embed_sum": "embedding_sum", "cluster_usage": "cluster_usage", "initialized": "_initialized"}


def hf_to_moshi(
    tensors: dict[str, torch.Tensor], config: HFMimiConfig, convtr_indices: set[int]
) -> dict[str, torch.Tensor]:
    """Transformers flat file keys (as written by `save_pretrained`) -> moshi `MimiModel.state_dict()` keys."""
    out: dict[str, torch.Tensor] = {}
    todo = dict(tensors)

    def put(key: str, value: torch.Tensor) -> None:
        assert key not in out, key
        out[key] = value.contiguous()

    # transformers: q/k/v are merged back into in_proj_weight, q and k in interleaved RoPE order
    for part in ("encoder_transformer", "decoder_transformer"):
        for layer in range(config.num_hidden_layers):
            src, dst = f"{part}.layers.{layer}", f"{part}.transformer.layers.{layer}"
            q = todo.pop(f"{src}.self_attn.q_proj.weight")
            k = todo.pop(f"{src}.self_attn.k_proj.weight")
            q = _permute_rotate_half_to_interleaved(q, config.num_attention_heads)
            k = _permute_rotate_half_to_interleaved(k, config.num_key_value_heads)
            v = todo.pop(f"{src}.self_attn.v_proj.weight")
            put(f"{dst}.self_attn.in_proj_weight", torch.cat([q, k, v], dim=0))
            renames = {
                "self_attn.o_proj.weight": "self_attn.out_proj.weight",
                "mlp.fc1.weight": "linear1.weight",
                "mlp.fc2.weight": "linear2.weight",
                "input_layernorm.weight": "norm1.weight",
                "input_layernorm.bias": "norm1.bias",
                "post_attention_layernorm.weight": "norm2.weight",
                "post_attention_layernorm.bias": "norm2.bias",
                "self_attn_layer_scale.scale": "layer_scale_1.scale",
                "mlp_layer_scale.scale": "layer_scale_2.scale",
            }
            for a, b in renames.items():
                put(f"{dst}.{b}", todo.pop(f"{src}.{a}"))

    put("downsample.conv.conv.conv.weight", todo.pop("downsample.conv.weight"))
    put("upsample.convtr.convtr.convtr.weight", todo.pop("upsample.conv.weight"))

    halves = {"semantic": ("rvq_first", config.num_semantic_quantizers),
              "acoustic": ("rvq_rest", config.num_quantizers - config.num_semantic_quantizers)}
    for half, (dst_half, n) in halves.items():
        src, dst = f"quantizer.{half}_residual_vector_quantizer", f"quantizer.{dst_half}"
        for proj in ("input_proj", "output_proj"):
            put(f"{dst}.{proj}.weight", todo.pop(f"{src}.{proj}.weight"))
        for j in range(n):
            for a, b in CODEBOOK_BUFFERS.items():
                put(f"{dst}.vq.layers.{j}._codebook.{b}", todo.pop(f"{src}.layers.{j}.codebook.{a}"))

    # SEANet: encoder.layers.i.[block.b.]conv.{weight,bias} -> encoder.model.i.[block.b.]conv.conv.*
    for key in sorted(k for k in todo if k.startswith(("encoder.layers.", "decoder.layers."))):
        top, _, idx, *rest = key.split(".")
        assert rest[-2] == "conv", key
        is_convtr = top == "decoder" and int(idx) in convtr_indices and rest[0] != "block"
        inner = "convtr.convtr" if is_convtr else "conv.conv"
        put(".".join([top, "model", idx, *rest[:-2], inner, rest[-1]]), todo.pop(key))

    assert not todo, f"unmapped transformers keys: {sorted(todo)}"
    return out


@dataclass
class MimiReference:
    """A transformers MimiModel with seeded random weights, saved in both checkpoint formats."""

    size: str
    model: MimiModel
    hf_dir: Path  # save_pretrained output
    moshi_file: Path  # moshi key names
    raw_peak: float  # decoded peak of speech_1s before the output rescale
    _memo: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> HFMimiConfig:
        return self.model.config

    def _key(self, kind: str, arr: np.ndarray, extra: Any = None) -> tuple:
        return (kind, arr.shape, arr.dtype.str, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest(), extra)

    def encode(self, audio: np.ndarray, num_quantizers: int | None = None) -> np.ndarray:
        """float32 [B, N] -> int64 codes [B, K, T] from `MimiModel.encode` (memoised)."""
        audio = np.asarray(audio, np.float32)
        key = self._key("enc", audio, num_quantizers)
        if key not in self._memo:
            with torch.no_grad():
                out = self.model.encode(torch.from_numpy(audio)[:, None, :], num_quantizers=num_quantizers)
            self._memo[key] = out.audio_codes.numpy()
        return self._memo[key]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [B, K, T] -> float32 audio [B, N] from `MimiModel.decode` (memoised)."""
        codes = np.asarray(codes, np.int64)
        key = self._key("dec", codes)
        if key not in self._memo:
            with torch.no_grad():
                out = self.model.decode(torch.from_numpy(codes)).audio_values
            assert out.shape[1] == 1
            self._memo[key] = out[:, 0].numpy()
        return self._memo[key]


def build_reference(size: str, root: Path) -> MimiReference:
    config = HFMimiConfig(**TINY_KWARGS) if size == "tiny" else HFMimiConfig()
    torch.manual_seed(1234 if size == "tiny" else 4321)
    model = MimiModel(config).eval()
    randomize_mimi_(model, seed=99 if size == "tiny" else 77)
    raw_peak = calibrate_(model)

    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    moshi = hf_to_moshi(tensors, config, convtr_indices(model))
    if size == "full":  # the counts of the official checkpoints (spec 2.3 / 2.4)
        assert (len(tensors), len(moshi)) == (350, 318), (len(tensors), len(moshi))
    moshi_file = root / "mimi_moshi.safetensors"
    save_file(moshi, str(moshi_file))
    return MimiReference(size, model, hf_dir, moshi_file, raw_peak)


def convtr_indices(model: MimiModel) -> set[int]:
    """Indices of the transposed convolutions in the SEANet decoder (moshi names them `convtr.convtr`)."""
    return {i for i, layer in enumerate(model.decoder.decoder_seanet.layers) if isinstance(layer, MimiConvTranspose1d)}


def get_reference(size: str, tmp_path_factory: pytest.TempPathFactory) -> MimiReference:
    return _memo(("ref", size), lambda: build_reference(size, tmp_path_factory.mktemp(f"mimi_{size}")))


def get_codec(size: str, fmt: str, tmp_path_factory: pytest.TempPathFactory) -> csm_jax.MimiCodec:
    """csm_jax codec loaded from the reference's HF directory (`fmt="hf"`) or moshi file (`fmt="moshi"`)."""

    def load() -> csm_jax.MimiCodec:
        ref = get_reference(size, tmp_path_factory)
        if fmt == "hf":
            return csm_jax.load_codec(ref.hf_dir)
        # moshi files carry no config: the tiny architecture is passed as the transformers config dict
        config = None if size == "full" else ref.config.to_dict()
        return csm_jax.load_codec(ref.moshi_file, config=config)

    return _memo(("codec", size, fmt), load)


# -------------------------------------------------------------------------------------------- fixtures ---
@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory: pytest.TempPathFactory) -> MimiReference:
    return get_reference("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def full_ref(tmp_path_factory: pytest.TempPathFactory) -> MimiReference:
    return get_reference("full", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_codec(tmp_path_factory: pytest.TempPathFactory) -> csm_jax.MimiCodec:
    return get_codec("tiny", "hf", tmp_path_factory)


@pytest.fixture(scope="session")
def full_codec(tmp_path_factory: pytest.TempPathFactory) -> csm_jax.MimiCodec:
    return get_codec("full", "hf", tmp_path_factory)


@pytest.fixture(scope="session", params=SIZES)
def size(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def ref(size: str, tmp_path_factory: pytest.TempPathFactory) -> MimiReference:
    return get_reference(size, tmp_path_factory)


@pytest.fixture(scope="session")
def codec(size: str, tmp_path_factory: pytest.TempPathFactory) -> csm_jax.MimiCodec:
    """The HF-directory codec of the parametrised size."""
    return get_codec(size, "hf", tmp_path_factory)
