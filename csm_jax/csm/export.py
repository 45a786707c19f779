"""Write a CSM as a transformers directory (`config.json` + `model.safetensors` [+ `tokenizer.json`]) that
`transformers.CsmForConditionalGeneration.from_pretrained` and `csm_jax.load_csm` read, optionally with its Mimi
codec under `codec_model.` (the layout of sesame/csm-1b) and any extra files (e.g. `prompt.json`).

The tensors are the inverse of the loader's mapping (`csm_jax.csm.weights`, transformers format): every entry only
moves elements, so `csm_jax.weights.invert` undoes it (the fused q/k/v kernel [Hkv, H/Hkv + 2, hd, D] splits back
into q [H*hd, D], k and v [Hkv*hd, D]; the audio heads go back to [K-1, D_d, V]). The tied audio embedding is
written once, as `depth_decoder.model.embed_tokens.weight`, as transformers 5 saves it (it ties
`backbone_model.embed_tokens.embed_audio_tokens.weight` to that key on load). Without a codec, transformers builds
its default (full-size, random) Mimi and reports the `codec_model.*` weights missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from csm_jax.checkpoint import CheckpointError
from csm_jax.codec import export as codec_export
from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.csm.config import CsmConfig, LlamaConfig
from csm_jax.csm.prompt import BOS, EOS
from csm_jax.csm.sampling import GENERATION_CONFIG, Sampling
from csm_jax.csm.weights import _HF_AUDIO_KEYS, _entries, abstract_params
from csm_jax.weights import invert

DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}
CODEC_PREFIX = "codec_model."
AUDIO_KEY = _HF_AUDIO_KEYS[1]  # the tied audio embedding's key as transformers 5 saves it
RESERVED = ("config.json", "model.safetensors", "tokenizer.json", GENERATION_CONFIG)
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"  # the CsmProcessor's audio placeholder tokens


def _llama(c: LlamaConfig) -> dict[str, Any]:
    """The Llama fields of one stack; RoPE as transformers 5 `rope_parameters` (theta inside)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        factor, low, high, original = c.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}
    return {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
            "rms_norm_eps": c.norm_eps, "rope_parameters": rope, "max_position_embeddings": c.max_seq_len,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def token_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """The config's text token ids from `tokenizer` (BOS/EOS, the processor's `<|AUDIO|>` / `<|audio_eos|>`,
    pad = `<|AUDIO|>` as in sesame/csm-1b); None for each one it lacks, or without a tokenizer."""
    get = (lambda token: None) if tokenizer is None else tokenizer.token_to_id
    return {"bos_token_id": get(BOS), "eos_token_id": get(EOS), "pad_token_id": get(AUDIO),
            "audio_token_id": get(AUDIO), "audio_eos_token_id": get(AUDIO_EOS)}


def transformers_config(cfg: CsmConfig, codec_config: MimiConfig | None = None, **extra: Any) -> dict[str, Any]:
    """The transformers `CsmConfig` dict (config.json) of `cfg`, plus `extra` fields (e.g. `token_ids(tok)`);
    `CsmConfig.from_hf` of it gives `cfg` back (but for the compute `dtype`, which it does not hold). The codec's
    config is embedded as `codec_config` when given; ValueError for one transformers cannot build."""
    out: dict[str, Any] = {
        "model_type": "csm", "architectures": ["CsmForConditionalGeneration"], "dtype": "float32",
        **_llama(cfg.backbone), "num_codebooks": cfg.num_codebooks, "vocab_size": cfg.audio_vocab_size,
        "text_vocab_size": cfg.text_vocab_size, "codebook_pad_token_id": cfg.audio_vocab_size - 1,
        "codebook_eos_token_id": 0, **token_ids(None),
        # transformers 5 ties on tie_codebooks_embeddings and ignores tie_word_embeddings; False is what 4.x
        # checkpoints hold (True there would try to tie lm_head to the input embeddings)
        "tie_codebooks_embeddings": True, "tie_word_embeddings": False,
        "depth_decoder_config": {"model_type": "csm_depth_decoder_model", **_llama(cfg.decoder),
                                 "num_codebooks": cfg.num_codebooks, "vocab_size": cfg.audio_vocab_size,
                                 "backbone_hidden_size": cfg.backbone.hidden_size},
    }
    for name in ("input_codebooks", "context_codebooks"):  # csm-jax's extensions (CsmConfig): transformers ignores them
        if getattr(cfg, name) is not None:
            out[name] = getattr(cfg, name)
    if codec_config is not None:
        out["codec_config"] = codec_export.transformers_config(codec_config)
    return out | extra


def transformers_tensors(params: Any, cfg: CsmConfig) -> dict[str, np.ndarray]:
    """Flax CSM params -> `CsmForConditionalGeneration` state-dict tensors (key -> float32 array, torch layout:
    Linear weights [out, in], `depth_decoder.codebooks_head.weight` [K-1, D_d, V]); ValueError if they do not
    fit `cfg`."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(params).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract_params(cfg)).items()}
    problems = [f"missing {p} {list(s)}" for p, s in want.items() if p not in flat]
    problems += [f"unexpected {p} {list(v.shape)}" for p, v in flat.items() if p not in want]
    problems += [f"{p} has shape {list(v.shape)}, expected {list(want[p])}" for p, v in flat.items()
                 if p in want and v.shape != want[p]]
    if problems:
        raise ValueError("params do not fit the CSM config: " + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    out: dict[str, np.ndarray] = {}
    for entry in _entries(cfg, "hf", AUDIO_KEY):
        out.update(invert(entry, flat[entry.path]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` as an absolute path; CheckpointError unless it is a new or empty directory."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not an empty directory; refusing to overwrite")
    return out_dir


def export_transformers(params: Any, cfg: CsmConfig, out_dir: str | Path, *, codec: MimiCodec | None = None,
                        tokenizer: Tokenizer | None = None, dtype: str = "float32",
                        extra_files: Mapping[str, str] | None = None, sampling: Sampling | None = None) -> Path:
    """Write the CSM to the new or empty directory `out_dir`; returns its path.

    `codec`: written under `codec_model.` (its config as `codec_config`); it must have at least `num_codebooks`
    quantizers. `tokenizer`: saved as tokenizer.json, its special token ids put in the config. `dtype`: "float32",
    "float16" or "bfloat16", for every tensor (codec included; `load_csm` reads them back as float32).
    `extra_files`: file name -> text (e.g. "prompt.json"). `sampling`: the model's sampling settings, written as
    transformers' `generation_config.json` (its `generate` and `load_csm` use them). Everything is checked before
    anything is written.
    A model with `cfg.input_codebooks` or `cfg.context_codebooks` set keeps them in config.json, where transformers
    ignores them (it embeds every codebook): such a directory generates as it was trained only in csm-jax.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; known: {list(DTYPES)}")
    out_dir = check_out_dir(out_dir)
    extra_files = dict(extra_files or {})
    bad_names = [n for n in extra_files if n in RESERVED or n in ("", ".", "..") or Path(n).name != n]
    if bad_names:
        raise ValueError(f"extra_files names must be plain file names other than {list(RESERVED)}: {bad_names}")
    if codec is not None and codec.config.num_quantizers < cfg.num_codebooks:
        raise ValueError(f"codec has {codec.config.num_quantizers} codebooks, CSM needs {cfg.num_codebooks}")
    config = transformers_config(cfg, None if codec is None else codec.config, **token_ids(tokenizer), dtype=dtype)
    tensors = transformers_tensors(params, cfg)
    if codec is not None:
        tensors |= {CODEC_PREFIX + k: v for k, v in
                    codec_export.transformers_tensors(codec.params, codec.config).items()}
    with np.errstate(over="ignore"):  # float16 overflow becomes inf, reported just below
        cast = {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in tensors.items()}
    bad = [k for k, v in cast.items() if not np.all(np.isfinite(v.astype(np.float32)))]
    if bad:
        hint = " (float16 overflows beyond 65504: use bfloat16 or float32)" if dtype == "float16" else ""
        raise ValueError(f"{len(bad)} tensor(s) are not finite in {dtype}{hint}, e.g. {bad[0]}")
    tokenizer_json = None if tokenizer is None else tokenizer.to_str(pretty=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(cast, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (out_dir / "tokenizer.json").write_text(tokenizer_json)
    if sampling is not None:
        sampling.save(out_dir)
    for name, text in extra_files.items():
        (out_dir / name).write_text(text)
    return out_dir
