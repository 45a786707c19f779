"""Builders for the CSM generation tests (`test_csm_generation.py`).

The oracle is transformers' `CsmForConditionalGeneration` (eager attention, fp32) with the weights redrawn by
`csm_fixtures.randomize_csm_` (linear / head weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1)), so its logits are
of order 1 and greedy decoding is far from ties. Unlike the parity shapes of `csm_fixtures`, every generation
shape carries a tiny Mimi with one quantizer per CSM codebook and 16 entries per codebook (Mimi needs a power of
2), with random codebooks (`embed_sum` ~ N(0, 1); a zero `embed_sum`
would map every vector to code 0). `<|AUDIO|>` / `<|audio_eos|>` are real text ids (3 / 4) so transformers' own
`input_ids` + `input_values` path can be driven.

- `tiny`: K=4 codebooks of 16 (= the Mimi codebook size, so every generated code can be decoded: the audio
  tests use this shape), backbone 64 wide (4/2 heads, 2 layers), depth decoder 32 wide, CSM-1B RoPE.
- `rope`: K=8 codebooks of 17 (> the Mimi codebook size, as CSM-1B's 2051 > 2048: codes only), multi-head
  backbone, llama3 RoPE parameters whose scaling bites inside the tested lengths.

Each shape is also written with the ORIGINAL Sesame key names (spec §2.1, the inverse of the §2.2 mapping,
written here independently of csm_jax) next to an original-style `config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from csm_fixtures import ROPE_CSM, ROPE_SHORT_BACKBONE, ROPE_SHORT_DEPTH, TINY_MIMI, randomize_csm_
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, processors
from transformers import CsmConfig as HFCsmConfig
from transformers import CsmDepthDecoderConfig, CsmForConditionalGeneration, MimiConfig

FRAME = 1920  # samples per 80 ms frame at 24 kHz

# ------------------------------------------------------------------------------------------ tokenizer ---
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"
SPECIALS = ("<unk>", BOS, EOS, AUDIO, AUDIO_EOS)  # ids 0..4
CHARS = "[]0123 abcdefghijklmnopqrstuvwxyzH.!?"  # one token per character, ids 5..41 (all < text vocab 40/50)
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
AUDIO_TOKEN_ID, AUDIO_EOS_TOKEN_ID = VOCAB[AUDIO], VOCAB[AUDIO_EOS]


def char_ids(text: str) -> list[int]:
    """What the tokenizer gives for `text` without special tokens (one id per character)."""
    return [VOCAB[c] for c in text]


def write_tokenizer(path: Path) -> None:
    """A character-level BPE (no merges) with the Llama-3 special tokens. Its post-processor prepends BOS, as
    Llama-3's does; csm_jax must add BOS/EOS itself (encode with add_special_tokens=False), not twice."""
    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, VOCAB[BOS])])
    assert tok.encode("[0]Hi", add_special_tokens=False).ids == char_ids("[0]Hi")
    tok.save(str(path))


# --------------------------------------------------------------------------------------------- shapes ---
@dataclass(frozen=True)
class GenShape:
    name: str
    backbone: dict[str, Any]
    depth: dict[str, Any]
    seed: int


GEN_SHAPES: dict[str, GenShape] = {
    "tiny": GenShape(
        "tiny",
        backbone=dict(num_codebooks=4, vocab_size=16, text_vocab_size=50, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters=ROPE_CSM),
        depth=dict(num_codebooks=4, backbone_hidden_size=64, vocab_size=16, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=5,
                   rope_parameters=ROPE_CSM),
        seed=101,
    ),
    "rope": GenShape(
        "rope",
        backbone=dict(num_codebooks=8, vocab_size=17, text_vocab_size=40, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=96,
                      rope_parameters=ROPE_SHORT_BACKBONE),
        depth=dict(num_codebooks=8, backbone_hidden_size=64, vocab_size=17, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=9,
                   rope_parameters=ROPE_SHORT_DEPTH),
        seed=202,
    ),
}


def hf_gen_config(shape: str) -> HFCsmConfig:
    s = GEN_SHAPES[shape]
    k, vocab = s.backbone["num_codebooks"], s.backbone["vocab_size"]
    mimi = MimiConfig(**{**TINY_MIMI, "num_quantizers": k, "codebook_size": 16})
    return HFCsmConfig(**s.backbone, pad_token_id=None, bos_token_id=None, audio_token_id=AUDIO_TOKEN_ID,
                       audio_eos_token_id=AUDIO_EOS_TOKEN_ID, codebook_pad_token_id=vocab - 1,
                       depth_decoder_config=CsmDepthDecoderConfig(**s.depth), codec_config=mimi,
                       attn_implementation="eager")


def build_model(shape: str) -> CsmForConditionalGeneration:
    s = GEN_SHAPES[shape]
    torch.manual_seed(s.seed)
    model = CsmForConditionalGeneration(hf_gen_config(shape)).eval()
    randomize_csm_(model, seed=s.seed + 1)
    gen = torch.Generator().manual_seed(s.seed + 2)
    with torch.no_grad():
        for name, buf in model.codec_model.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_(generator=gen)
    return model


# ---------------------------------------------------------------------------------- original format ---
def interleave_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows -> torchtune's interleaved order (inverse of convert_csm.py's
    `permute_for_rope`)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def permute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_csm.py: interleaved -> rotate-half (used here only to check `interleave_qk`)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def original_state_dict(model: CsmForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's CSM weights under the original Sesame names (spec §2.1), q/k rows interleaved."""
    cfg, dcfg = model.config, model.config.depth_decoder_config
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("codec_model.")}
    out = {
        "text_embeddings.weight": sd.pop("embed_text_tokens.weight"),
        "audio_embeddings.weight": sd.pop("backbone_model.embed_tokens.embed_audio_tokens.weight"),
        "projection.weight": sd.pop("depth_decoder.model.inputs_embeds_projector.weight"),
        "codebook0_head.weight": sd.pop("lm_head.weight"),
        "audio_head": sd.pop("depth_decoder.codebooks_head.weight"),
        "backbone.norm.scale": sd.pop("backbone_model.norm.weight"),
        "decoder.norm.scale": sd.pop("depth_decoder.model.norm.weight"),
    }
    depth_audio = sd.pop("depth_decoder.model.embed_tokens.weight")
    assert torch.equal(depth_audio, out["audio_embeddings.weight"])  # tied
    sd.pop("backbone_model.embed_tokens.audio_tokens_offsets", None)
    sd.pop("depth_decoder.model.embed_tokens.audio_tokens_offsets", None)
    names = {"self_attn.o_proj": "attn.output_proj", "self_attn.v_proj": "attn.v_proj", "mlp.gate_proj": "mlp.w1",
             "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2"}
    for theirs, ours, c in (("backbone_model", "backbone", cfg), ("depth_decoder.model", "decoder", dcfg)):
        for i in range(c.num_hidden_layers):
            src, dst = f"{theirs}.layers.{i}", f"{ours}.layers.{i}"
            for proj, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads)):
                w = sd.pop(f"{src}.self_attn.{proj}_proj.weight")
                inter = interleave_qk(w, heads)
                assert torch.equal(permute_for_rope(inter, heads), w)
                out[f"{dst}.attn.{proj}_proj.weight"] = inter.contiguous()
            for a, b in names.items():
                out[f"{dst}.{b}.weight"] = sd.pop(f"{src}.{a}.weight")
            out[f"{dst}.sa_norm.scale"] = sd.pop(f"{src}.input_layernorm.weight")
            out[f"{dst}.mlp_norm.scale"] = sd.pop(f"{src}.post_attention_layernorm.weight")
    assert not sd, sorted(sd)  # every tensor mapped
    return out


def write_original(model: CsmForConditionalGeneration, path: Path) -> Path:
    """model.safetensors with original keys + the original `config.json` (ModelArgs). The original format only
    knows the full-size flavours, so this config does NOT describe these tiny weights."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(original_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    (path / "config.json").write_text(json.dumps({
        "backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "text_vocab_size": cfg.text_vocab_size,
        "audio_vocab_size": cfg.vocab_size, "audio_num_codebooks": cfg.num_codebooks}))
    return path


def jax_config(model: CsmForConditionalGeneration) -> Any:
    """The csm_jax CsmConfig of a tiny transformers model, built field by field (not via CsmConfig.from_hf)."""
    from csm_jax.csm import CsmConfig, LlamaConfig

    def stack(c: Any, max_seq_len: int) -> LlamaConfig:
        rope = c.rope_parameters
        assert rope["rope_type"] == "llama3"
        return LlamaConfig(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                           num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                           intermediate_size=c.intermediate_size, norm_eps=c.rms_norm_eps,
                           rope_theta=float(rope["rope_theta"]),
                           rope_scaling=(float(rope["factor"]), float(rope["low_freq_factor"]),
                                         float(rope["high_freq_factor"]),
                                         int(rope["original_max_position_embeddings"])),
                           max_seq_len=max_seq_len)

    cfg = model.config
    dcfg = cfg.depth_decoder_config
    return CsmConfig(backbone=stack(cfg, cfg.max_position_embeddings),
                     decoder=stack(dcfg, dcfg.max_position_embeddings), text_vocab_size=cfg.text_vocab_size,
                     audio_vocab_size=cfg.vocab_size, num_codebooks=cfg.num_codebooks)


# -------------------------------------------------------------------------------------- HF reference ---
def embed_prompt(model: CsmForConditionalGeneration, tokens: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """tokens int [S, K+1], mask bool [S, K+1] -> inputs_embeds [1, S, D]: the masked sum of the K audio-column
    embeddings (`embed_audio_tokens`, row code + k * vocab) and the text-column embedding (`embed_text_tokens`)."""
    cfg = model.config
    k, vocab = cfg.num_codebooks, cfg.vocab_size
    t = torch.from_numpy(np.asarray(tokens, np.int64))[None]
    m = torch.from_numpy(np.asarray(mask, bool))[None].to(torch.float32)
    with torch.no_grad():
        audio = model.backbone_model.embed_tokens.embed_audio_tokens(t[..., :k] + torch.arange(k) * vocab)
        text = model.embed_text_tokens(t[..., k])
        return (torch.cat([audio, text[:, :, None]], dim=2) * m[..., None]).sum(dim=2)


def hf_greedy(model: CsmForConditionalGeneration, n: int, **inputs: Any) -> np.ndarray:
    """transformers' own `generate`, greedy for the backbone and the depth decoder -> int [T, K] (T <= n; the
    EOS frame, if any, is kept, as transformers does)."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=n)
    assert out.ndim == 3 and out.shape[0] == 1, out.shape
    return out[0].numpy()


def hf_greedy_embeds(model: CsmForConditionalGeneration, tokens: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    return hf_greedy(model, n, inputs_embeds=embed_prompt(model, tokens, mask))


# -------------------------------------------------------------------------------------------- inputs ---
def make_prompt(cfg: HFCsmConfig, layout: tuple[tuple[str, int], ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows per (kind, count) in `layout`: `text` rows (mask on column K, ids in 5..text_vocab), `audio` rows
    (mask on 0..K-1, codes in 1..vocab) or one `eos` row (the all-zero audio frame). Masked columns hold
    random in-range ids (they must not matter)."""
    k, vocab, text_vocab = cfg.num_codebooks, cfg.vocab_size, cfg.text_vocab_size
    rng = np.random.default_rng(seed)
    rows_t, rows_m = [], []
    for kind, count in layout:
        t = np.concatenate([rng.integers(1, vocab, (count, k)), rng.integers(5, text_vocab, (count, 1))], axis=1)
        m = np.zeros((count, k + 1), bool)
        if kind == "text":
            m[:, k] = True
        elif kind == "audio":
            m[:, :k] = True
        else:
            assert kind == "eos", kind
            t[:, :k], m[:, :k] = 0, True
        rows_t.append(t)
        rows_m.append(m)
    return np.concatenate(rows_t).astype(np.int32), np.concatenate(rows_m)


def sine(frames: int, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """float32 mono test audio, `frames` * 1920 samples: a tone plus a little noise."""
    n = frames * FRAME
    t = np.arange(n) / 24_000
    noise = np.random.default_rng(seed).normal(0, 0.05, n)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


# -------------------------------------------------------------------------------------------- cases ---
_CACHE: dict[Any, Any] = {}


def _memo(key: Any, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


@dataclass
class GenCase:
    shape: str
    model: CsmForConditionalGeneration
    hf_dir: Path  # save_pretrained + tokenizer.json (codec weights under codec_model.)
    gen: Any  # csm_jax.load_csm(hf_dir)

    @property
    def k(self) -> int:
        return self.model.config.num_codebooks


def get_case(shape: str, tmp_path_factory: pytest.TempPathFactory) -> GenCase:
    def build() -> GenCase:
        import csm_jax

        model = build_model(shape)
        hf_dir = tmp_path_factory.mktemp(f"csm_gen_{shape}")
        model.save_pretrained(hf_dir)
        write_tokenizer(hf_dir / "tokenizer.json")
        return GenCase(shape, model, hf_dir, csm_jax.load_csm(hf_dir))

    return _memo(("case", shape), build)


def get_original_dir(shape: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = get_case(shape, tmp_path_factory)
    return _memo(("original", shape), lambda: write_original(case.model, tmp_path_factory.mktemp(f"orig_{shape}")))


def no_tokenizer_generator(case: GenCase) -> Any:
    """The same weights and codec, without a tokenizer (shares the compiled engines' parameters)."""
    import csm_jax

    return csm_jax.Generator(case.gen.params, case.gen.cfg, case.gen.codec, None)
