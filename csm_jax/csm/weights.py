"""Load CSM weights from a transformers directory, an original Sesame checkpoint, or a converted orbax directory.

Formats are told apart by key prefix: `backbone_model.layers.` (transformers) vs `backbone.layers.` (original,
whose q/k rows are in torchtune's interleaved RoPE order and are permuted on load). The audio embedding table is
tied: transformers 5.x writes it only as `depth_decoder.model.embed_tokens.weight`, older files as
`backbone_model.embed_tokens.embed_audio_tokens.weight`; either (or both, if equal) is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from csm_jax import checkpoint, hub
from csm_jax.checkpoint import CheckpointError
from csm_jax.csm import quantize
from csm_jax.csm.config import CsmConfig, LlamaConfig
from csm_jax.csm.prompt import PROMPT_FILE
from csm_jax.csm.sampling import GENERATION_CONFIG
from csm_jax.csm.voices import VOICES_DIR, VOICES_FILE
from csm_jax.weights import Entry, convert, read_safetensors, rope_interleaved_to_half, same

CHECKPOINT_KIND = "csm"
# what the CSM loaders read from a hub repo: transformers files (the codec rides in model.safetensors), the tokenizer,
# csm-jax's prompt settings, and a converted checkpoint (orbax params + codec); not e.g. sesame/csm-1b's ckpt.pt
HUB_FILES = ("config.json", "model.safetensors", GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", PROMPT_FILE, VOICES_FILE, f"{VOICES_DIR}/*", checkpoint.META_FILE, "params/*",
             "codec/*")
# Converted checkpoints name their parameter layout in their JSON description (kernels [out, in], q/k/v fused);
# older ones (no such entry: separate [in, out] kernels) are re-mapped on load.
LAYOUT_KEY, LAYOUT = "csm_param_layout", "qkv_out_in"
QUANTIZE_KEY = "csm_weight_quantization"  # the kernels' weight-only mode, "int8" or "bf16" (csm.quantize)
FLOAT_KERNELS_KEY = "csm_float_kernels"  # the kernels that mode left in the compute dtype; absent: none
_HF_AUDIO_KEYS = ("backbone_model.embed_tokens.embed_audio_tokens.weight", "depth_decoder.model.embed_tokens.weight")


def abstract_params(cfg: CsmConfig) -> dict[str, Any]:
    """Unboxed parameter tree of ShapeDtypeStruct for `cfg`, without allocating."""
    from csm_jax.csm.model import Csm

    k = cfg.num_codebooks
    tokens, mask = jnp.zeros((1, 1, k + 1), jnp.int32), jnp.ones((1, 1, k + 1), bool)
    boxed = jax.eval_shape(lambda: Csm(cfg).init(jax.random.key(0), tokens, mask))["params"]
    return nn.meta.unbox(boxed)


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int, head_dim: int) -> np.ndarray:
    """torch q [H*hd, D], k and v [Hkv*hd, D] -> the fused kernel [Hkv, H/Hkv + 2, hd, D] (per KV head: its
    query heads, its key, its value)."""
    d = q.shape[-1]
    q = q.reshape(kv_heads, -1, head_dim, d)
    return np.concatenate([q, k.reshape(kv_heads, 1, head_dim, d), v.reshape(kv_heads, 1, head_dim, d)], axis=1)


def _stack_entries(cfg: LlamaConfig, ours: str, theirs: str, fmt: str) -> Iterator[Entry]:
    hd, d = cfg.head_dim, cfg.hidden_size
    h, hkv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    for i in range(cfg.num_layers):
        o, t = f"{ours}/layers_{i}", f"{theirs}.layers.{i}"
        if fmt == "hf":
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                     "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight"}
        else:
            names = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.output_proj",
                     "gate": "mlp.w1", "up": "mlp.w3", "down": "mlp.w2", "ln1": "sa_norm.scale",
                     "ln2": "mlp_norm.scale"}
        # Linear kernels are [out, in], as torch stores them; q/k/v are fused (see llama)
        rope = (lambda w, heads: w) if fmt == "hf" else rope_interleaved_to_half
        keys = tuple((f"{t}.{names[proj]}.weight", (rows, d)) for proj, rows in
                     (("q", h * hd), ("k", hkv * hd), ("v", hkv * hd)))
        yield Entry(f"{o}/self_attn/qkv_proj/kernel", keys,
                    lambda q, k, v, rope=rope: fuse_qkv(rope(q, h), rope(k, hkv), v, hkv, hd))
        yield same(f"{o}/mlp/gate_proj/kernel", f"{t}.{names['gate']}.weight", (inter, d))
        yield same(f"{o}/mlp/up_proj/kernel", f"{t}.{names['up']}.weight", (inter, d))
        yield same(f"{o}/self_attn/o_proj/kernel", f"{t}.{names['o']}.weight", (d, h * hd))
        yield same(f"{o}/mlp/down_proj/kernel", f"{t}.{names['down']}.weight", (d, inter))
        yield same(f"{o}/input_layernorm/scale", f"{t}.{names['ln1']}", (d,))
        yield same(f"{o}/post_attention_layernorm/scale", f"{t}.{names['ln2']}", (d,))
    yield same(f"{ours}/norm/scale", f"{theirs}.norm.weight" if fmt == "hf" else f"{theirs}.norm.scale", (d,))


def _entries(cfg: CsmConfig, fmt: str, audio_key: str) -> Iterator[Entry]:
    bb, dd = cfg.backbone.hidden_size, cfg.decoder.hidden_size
    v, k = cfg.audio_vocab_size, cfg.num_codebooks
    hf = fmt == "hf"
    yield same("text_embeddings", "embed_text_tokens.weight" if hf else "text_embeddings.weight",
               (cfg.text_vocab_size, bb))
    yield same("audio_embeddings", audio_key, (k * v, bb))
    yield same("projection", "depth_decoder.model.inputs_embeds_projector.weight" if hf else "projection.weight",
               (dd, bb))
    yield same("codebook0_head", "lm_head.weight" if hf else "codebook0_head.weight", (v, bb))
    # the audio heads are stored [K-1, D_d, V] (used as h @ head); ours are [K-1, V, D_d] like the other kernels
    yield Entry("audio_head", (("depth_decoder.codebooks_head.weight" if hf else "audio_head", (k - 1, dd, v)),),
                lambda w: w.transpose(0, 2, 1))
    yield from _stack_entries(cfg.backbone, "backbone", "backbone_model" if hf else "backbone", fmt)
    yield from _stack_entries(cfg.decoder, "decoder", "depth_decoder.model" if hf else "decoder", fmt)


def detect_format(keys: set[str]) -> str:
    if any(k.startswith("backbone_model.layers.") for k in keys):
        return "hf"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "original"
    raise CheckpointError("not a CSM checkpoint: no 'backbone_model.layers.*' (transformers) or "
                          "'backbone.layers.*' (original Sesame) tensors")


def convert_csm(tensors: dict[str, np.ndarray], cfg: CsmConfig, source: str) -> dict[str, Any]:
    """File tensors -> Flax CSM params (float32), strictly."""
    fmt = detect_format(set(tensors))
    audio_key = "audio_embeddings.weight"
    if fmt == "hf":
        present = [key for key in _HF_AUDIO_KEYS if key in tensors]
        if len(present) == 2:
            if not np.array_equal(tensors[present[0]], tensors[present[1]]):
                raise CheckpointError(f"{source}: the tied audio embeddings {present} differ")
            tensors = {key: value for key, value in tensors.items() if key != present[1]}
        audio_key = present[0] if present else _HF_AUDIO_KEYS[0]
    params = convert(tensors, _entries(cfg, fmt, audio_key), source, f"CSM config ({fmt} format)")
    expected = {"/".join(p): v.shape for p, v in flax.traverse_util.flatten_dict(abstract_params(cfg)).items()}
    got = {"/".join(p) for p in flax.traverse_util.flatten_dict(params)}
    assert got == set(expected), sorted(got ^ set(expected))  # the mapping covers exactly the model's params
    return params


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_csm_params(path: str | Path, config: CsmConfig | None = None) -> tuple[dict[str, Any], CsmConfig]:
    """(params, config) from a transformers CSM dir, an original Sesame dir/`.safetensors`, or a converted dir, each
    local or a hub repo id `org/name[@revision]` (`csm_jax.hub`). Codec weights stored alongside (`codec_model.*`)
    are skipped here; `csm_jax.load_codec` reads them."""
    path = hub.checkpoint_path(path, HUB_FILES)
    if path.is_dir() and checkpoint.is_converted(path):
        meta = checkpoint.read_meta(path, CHECKPOINT_KIND)
        cfg = config or CsmConfig.from_dict(meta["config"])
        if meta.get(LAYOUT_KEY) == LAYOUT:
            abstract = abstract_params(cfg)
            if meta.get(QUANTIZE_KEY) is not None:  # int8 or bf16 kernels, restored as saved (no re-quantising)
                if meta[QUANTIZE_KEY] not in quantize.MODES:
                    raise CheckpointError(f"{path}: unknown weight quantisation {meta[QUANTIZE_KEY]!r}")
                abstract = quantize.abstract_quantized(abstract, cfg, meta[QUANTIZE_KEY],
                                                       tuple(meta.get(FLOAT_KERNELS_KEY, ())))
            return checkpoint.restore(path, abstract), cfg
        # converted before the current layout (no layout entry): separate [in, out] kernels, mapped as a
        # transformers checkpoint would be
        old = jax.tree_util.tree_map(np.asarray, checkpoint.restore(path, _v1_abstract_params(cfg)))
        return convert_csm(_v1_as_transformers(old, cfg), cfg, str(path)), cfg
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"{path} has no model.safetensors and no {checkpoint.META_FILE}")
    tensors = read_safetensors(weights, exclude="codec_model.")
    if config is None:
        config_file = (path if path.is_dir() else path.parent) / "config.json"
        raw = _read_json(config_file)
        try:
            config = CsmConfig.from_hf(raw) if raw.get("model_type") == "csm" else CsmConfig.from_original(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file}: not a CSM config ({e})") from e
    return convert_csm(tensors, config, str(weights)), config


def save_converted(path: str | Path, params: Mapping[str, Any], cfg: CsmConfig) -> Path:
    """Write an orbax checkpoint that `load_csm_params` reads back (int8 or bf16 params from
    `quantize.quantize_params` included: they are stored as they are, int8 with their scales, and the config's
    compute dtype)."""
    path = checkpoint.save(path, params, CHECKPOINT_KIND, cfg.to_dict())
    meta_file = path / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta[LAYOUT_KEY] = LAYOUT
    mode = quantize.quantization(params)
    if mode is not None:
        meta[QUANTIZE_KEY] = mode
        meta[FLOAT_KERNELS_KEY] = list(quantize.float_kernels(params))
    meta_file.write_text(json.dumps(meta, indent=2))
    return path


def _v1_abstract_params(cfg: CsmConfig) -> dict[str, Any]:
    """The parameter tree of checkpoints converted before LAYOUT: separate q/k/v, kernels [in, out]."""

    def f32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def stack(c: LlamaConfig) -> dict[str, Any]:
        d, q, kv, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        layer = {"self_attn": {"q_proj": {"kernel": f32(d, q)}, "k_proj": {"kernel": f32(d, kv)},
                               "v_proj": {"kernel": f32(d, kv)}, "o_proj": {"kernel": f32(q, d)}},
                 "mlp": {"gate_proj": {"kernel": f32(d, inter)}, "up_proj": {"kernel": f32(d, inter)},
                         "down_proj": {"kernel": f32(inter, d)}},
                 "input_layernorm": {"scale": f32(d)}, "post_attention_layernorm": {"scale": f32(d)}}
        return {**{f"layers_{i}": layer for i in range(c.num_layers)}, "norm": {"scale": f32(d)}}

    bb, dd, v, k = cfg.backbone.hidden_size, cfg.decoder.hidden_size, cfg.audio_vocab_size, cfg.num_codebooks
    return {"text_embeddings": f32(cfg.text_vocab_size, bb), "audio_embeddings": f32(k * v, bb),
            "backbone": stack(cfg.backbone), "decoder": stack(cfg.decoder), "projection": f32(bb, dd),
            "codebook0_head": f32(bb, v), "audio_head": f32(k - 1, dd, v)}


def _v1_as_transformers(p: dict[str, Any], cfg: CsmConfig) -> dict[str, np.ndarray]:
    """A pre-LAYOUT parameter tree as transformers' CSM tensors (torch Linear weights [out, in])."""
    t = {"embed_text_tokens.weight": p["text_embeddings"], _HF_AUDIO_KEYS[1]: p["audio_embeddings"],
         "depth_decoder.model.inputs_embeds_projector.weight": p["projection"].T,
         "lm_head.weight": p["codebook0_head"].T, "depth_decoder.codebooks_head.weight": p["audio_head"]}
    for ours, theirs, c in (("backbone", "backbone_model", cfg.backbone),
                            ("decoder", "depth_decoder.model", cfg.decoder)):
        t[f"{theirs}.norm.weight"] = p[ours]["norm"]["scale"]
        for i in range(c.num_layers):
            layer, prefix = p[ours][f"layers_{i}"], f"{theirs}.layers.{i}"
            for block, projs in (("self_attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
                for proj in projs:
                    t[f"{prefix}.{block}.{proj}_proj.weight"] = layer[block][f"{proj}_proj"]["kernel"].T
            for norm in ("input_layernorm", "post_attention_layernorm"):
                t[f"{prefix}.{norm}.weight"] = layer[norm]["scale"]
    return t
