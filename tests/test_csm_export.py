"""`csm_jax.csm.export`: Flax CSM (+ Mimi, tokenizer) -> a transformers CSM directory, read back by `load_csm` and
by `CsmForConditionalGeneration.from_pretrained`.

The source is the `rope` generation shape of `csm_gen_fixtures` (K=8, llama3 RoPE that differs per stack, GQA in
the depth decoder, a tiny transformers Mimi bundled under `codec_model.`), saved with transformers' own
`save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from csm_gen_fixtures import build_model, embed_prompt, make_prompt, write_tokenizer
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import CsmConfig as HFCsmConfig
from transformers import CsmForConditionalGeneration

from csm_jax.checkpoint import CheckpointError
from csm_jax.codec import export as codec_export
from csm_jax.codec.codec import MimiCodec, load_codec
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.weights import abstract_params
from csm_jax.csm.__main__ import main
from csm_jax.csm.config import CsmConfig
from csm_jax.csm.export import export_transformers, transformers_config, transformers_tensors
from csm_jax.csm.generator import load_csm
from csm_jax.csm.sampling import GENERATION_CONFIG, Sampling
from csm_jax.csm.weights import load_csm_params
from csm_jax.default_model import tiny_mimi_config

SHAPE = "rope"


@dataclasses.dataclass
class Source:
    model: CsmForConditionalGeneration
    hf_dir: Path  # save_pretrained + tokenizer.json
    params: Any
    cfg: CsmConfig
    codec: MimiCodec  # the bundled tiny Mimi, as csm_jax reads it
    tokenizer: Tokenizer


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    model = build_model(SHAPE)
    hf_dir = tmp_path_factory.mktemp("csm_export_src")
    model.save_pretrained(hf_dir)
    write_tokenizer(hf_dir / "tokenizer.json")
    params, cfg = load_csm_params(hf_dir)
    return Source(model, hf_dir, params, cfg, load_codec(hf_dir), Tokenizer.from_file(str(hf_dir / "tokenizer.json")))


@pytest.fixture(scope="module")
def f32_dir(src: Source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The float32 export, with codec, tokenizer and an extra file."""
    return export_transformers(src.params, src.cfg, tmp_path_factory.mktemp("csm_export") / "f32", codec=src.codec,
                               tokenizer=src.tokenizer, extra_files={"README.md": "tiny CSM\n"})


def seeded_codec(cfg: MimiConfig, seed: int) -> MimiCodec:
    """A codec of `cfg` with seeded N(0, 0.1) weights; like `MimiCodec.random`, without compiling Mimi's init."""
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), abstract_params(cfg))
    return MimiCodec(params, cfg)


def flat(params: Any) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def file_dtypes(path: Path) -> set[str]:
    """The safetensors dtype names ("F32", "F16", "BF16") in the file."""
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # safe_open handles are not iterable
        return {str(f.get_slice(k).get_dtype()) for k in names}


def csm_state(model: CsmForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("codec_model.")}


def test_config_round_trip(src: Source) -> None:
    hf = transformers_config(src.cfg)
    assert CsmConfig.from_hf(json.loads(json.dumps(hf))) == src.cfg
    assert src.cfg.backbone.rope_scaling != src.cfg.decoder.rope_scaling  # both stacks' llama3 RoPE survive
    # default RoPE, a non-default decoder length and compute dtype kept apart
    cfg = src.cfg.replace(decoder=dataclasses.replace(src.cfg.decoder, rope_scaling=None, rope_theta=1234.0,
                                                      max_seq_len=21))
    assert CsmConfig.from_hf(transformers_config(cfg)) == cfg
    assert transformers_config(cfg)["depth_decoder_config"]["rope_parameters"] == {"rope_type": "default",
                                                                                   "rope_theta": 1234.0}
    # csm-jax's input_codebooks extension is kept (and absent when unset, as in every official checkpoint)
    assert "input_codebooks" not in hf
    assert "context_codebooks" not in hf
    for narrow in (src.cfg.replace(input_codebooks=3), src.cfg.replace(input_codebooks=1, context_codebooks=3)):
        assert CsmConfig.from_hf(json.loads(json.dumps(transformers_config(narrow)))) == narrow
    # what transformers reads from it: the fields transformers' own save_pretrained wrote for the same model
    theirs = json.loads((src.hf_dir / "config.json").read_text())
    parsed = HFCsmConfig(**hf).to_dict()
    for key in ("rope_parameters", "max_position_embeddings", "num_key_value_heads", "head_dim", "vocab_size",
                "text_vocab_size", "codebook_pad_token_id", "num_codebooks", "tie_codebooks_embeddings"):
        assert parsed[key] == theirs[key], key
    for key, value in theirs["depth_decoder_config"].items():
        if key not in ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "use_cache",
                       "attention_dropout"):
            assert parsed["depth_decoder_config"][key] == value, key
    assert parsed["tie_word_embeddings"] is True  # transformers sets it from tie_codebooks_embeddings
    # codec config and extra fields
    with_codec = transformers_config(src.cfg, src.codec.config, audio_token_id=3)
    assert with_codec["codec_config"] == codec_export.transformers_config(src.codec.config)
    assert with_codec["audio_token_id"] == 3 and hf["audio_token_id"] is None
    # transformers-4 configs (top-level rope_theta + rope_scaling, "type" or "rope_type") read the same
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    rope = dict(hf["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    for name in ("rope_type", "type"):
        legacy["rope_scaling"] = {name: rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_type"}}
        assert CsmConfig.from_hf(legacy).backbone == src.cfg.backbone, name


def test_float32_export_reloads_bit_identical(src: Source, f32_dir: Path) -> None:
    assert {p.name for p in f32_dir.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    params, cfg = load_csm_params(f32_dir)
    assert cfg == src.cfg
    ours, orig = flat(params), flat(src.params)
    assert ours.keys() == orig.keys()
    for key, value in orig.items():
        assert ours[key].dtype == np.float32 and np.array_equal(ours[key], value), key
    # the CSM tensors are exactly the ones transformers itself saved, under the same keys
    with safe_open(str(src.hf_dir / "model.safetensors"), "np") as a, \
            safe_open(str(f32_dir / "model.safetensors"), "np") as b:
        a_names, b_names = a.keys(), b.keys()
        theirs = {k for k in a_names if not k.startswith("codec_model.")}
        assert {k for k in b_names if not k.startswith("codec_model.")} == theirs
        for key in theirs:
            assert np.array_equal(a.get_tensor(key), b.get_tensor(key)), key
    assert transformers_tensors(src.params, src.cfg).keys() == theirs
    config = json.loads((f32_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["audio_token_id"] == 3 and config["audio_eos_token_id"] == 4
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert (f32_dir / "README.md").read_text() == "tiny CSM\n"


def test_transformers_loads_export(src: Source, f32_dir: Path) -> None:
    model, info = CsmForConditionalGeneration.from_pretrained(f32_dir, output_loading_info=True,
                                                              attn_implementation="eager")
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.float32
    ours, theirs = csm_state(model), csm_state(src.model)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    tied = model.backbone_model.embed_tokens.embed_audio_tokens.weight
    assert tied.data_ptr() == model.depth_decoder.model.embed_tokens.weight.data_ptr()
    tokens, mask = make_prompt(src.model.config, (("text", 5), ("audio", 6), ("text", 4)), seed=3)
    with torch.no_grad():
        want = src.model(inputs_embeds=embed_prompt(src.model, tokens, mask)).logits
        got = model(inputs_embeds=embed_prompt(model, tokens, mask)).logits
        assert want.shape == (1, len(tokens), src.cfg.audio_vocab_size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # the bundled codec decodes as the original
        codes = torch.from_numpy(np.random.default_rng(0).integers(0, 16, (1, src.cfg.num_codebooks, 3)))
        torch.testing.assert_close(model.codec_model.decode(codes).audio_values,
                                   src.model.codec_model.decode(codes).audio_values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export(src: Source, f32_dir: Path, tmp_path: Path, dtype: str) -> None:
    out = export_transformers(src.params, src.cfg, tmp_path / dtype, codec=src.codec, dtype=dtype)
    rounded = np.float16 if dtype == "float16" else jnp.bfloat16
    params, cfg = load_csm_params(out)
    assert cfg == src.cfg
    ours = flat(params)
    for key, value in flat(src.params).items():
        want = value.astype(rounded).astype(np.float32)
        assert ours[key].dtype == np.float32 and np.array_equal(ours[key], want), key
    assert not all(np.array_equal(ours[k], v) for k, v in flat(src.params).items())  # it did round
    codec = load_codec(out)
    for key, value in flat(src.codec.params).items():
        assert np.asarray(flat(codec.params)[key]).dtype == np.float32
        np.testing.assert_allclose(flat(codec.params)[key], value, rtol=1e-2, atol=1e-2, err_msg=key)
    assert file_dtypes(out / "model.safetensors") == {"F16" if dtype == "float16" else "BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    ratio = (out / "model.safetensors").stat().st_size / (f32_dir / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    model, info = CsmForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == getattr(torch, dtype)  # transformers 5 loads in the config's dtype
    for key, value in csm_state(src.model).items():
        assert torch.equal(csm_state(model)[key], value.to(model.dtype)), key


def test_bundled_codec_round_trip(src: Source, tmp_path: Path) -> None:
    codec = seeded_codec(tiny_mimi_config(), seed=1)
    assert codec.config.num_quantizers >= src.cfg.num_codebooks
    prompt = json.dumps({"max_context_turns": 3})
    out = export_transformers(src.params, src.cfg, tmp_path / "bundle", codec=codec, tokenizer=src.tokenizer,
                              extra_files={"prompt.json": prompt})
    gen = load_csm(out)
    assert gen.codec is not None and gen.codec.config == codec.config and gen.tokenizer is not None
    assert gen.tokenizer.to_str() == src.tokenizer.to_str() and gen.format.max_context_turns == 3
    for key, value in flat(codec.params).items():
        assert np.array_equal(flat(gen.codec.params)[key], value), key
    for key, value in flat(src.params).items():
        assert np.array_equal(flat(gen.params)[key], value), key
    codes = np.random.default_rng(1).integers(0, codec.config.codebook_size, (1, src.cfg.num_codebooks, 3))
    np.testing.assert_array_equal(np.asarray(gen.codec.decode(codes)), np.asarray(codec.decode(codes)))


def test_refusals_write_nothing(src: Source, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory; refusing to overwrite"):
        export_transformers(src.params, src.cfg, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_transformers(src.params, src.cfg, busy / "keep.txt")

    new = tmp_path / "new"
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"dtype": "int8"}, ValueError, r"unknown export dtype 'int8'; known: \['float32', 'float16', 'bfloat16'\]"),
        ({"dtype": "fp16"}, ValueError, "unknown export dtype 'fp16'"),
        ({"extra_files": {"config.json": "{}"}}, ValueError, "extra_files names must be plain file names"),
        ({"extra_files": {"../x.txt": ""}}, ValueError, "extra_files names must be plain file names"),
        ({"codec": seeded_codec(dataclasses.replace(tiny_mimi_config(), num_quantizers=4), seed=0)},
         ValueError, "codec has 4 codebooks, CSM needs 8"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            export_transformers(src.params, src.cfg, new, **kwargs)
        assert not new.exists(), kwargs
    wrong = src.cfg.replace(backbone=dataclasses.replace(src.cfg.backbone, intermediate_size=80))
    with pytest.raises(ValueError, match=r"params do not fit the CSM config: .*has shape \[96, 64\], expected "
                                         r"\[80, 64\]"):
        export_transformers(src.params, wrong, new)
    big = {**src.params, "projection": np.full_like(np.asarray(src.params["projection"]), 1e5)}
    with pytest.raises(ValueError, match="not finite in float16 .*use bfloat16 or float32.*inputs_embeds_projector"):
        export_transformers(big, src.cfg, new, dtype="float16")
    assert not new.exists()
    assert export_transformers(big, src.cfg, new, dtype="bfloat16") == new  # bfloat16 has float32's range


def test_generation_config(src: Source, tmp_path: Path) -> None:
    """A model's sampling settings travel as transformers' generation_config.json: transformers' CSM reads them
    for its backbone and depth decoder, `load_csm` reads them back, and an unreadable one is a clear error."""
    sampling = Sampling(temperature=0.3, top_k=20, depth_temperature=0.7, depth_top_k=1)  # greedy depth decoder
    out = export_transformers(src.params, src.cfg, tmp_path / "sampled", sampling=sampling)
    model = CsmForConditionalGeneration.from_pretrained(out)
    theirs, depth = model.generation_config, model.depth_decoder.generation_config
    assert (theirs.do_sample, theirs.temperature, theirs.top_k) == (True, 0.3, 20)
    assert depth.do_sample is False  # transformers decodes the depth decoder greedily, as csm-jax's top_k 1
    assert load_csm(out).sampling == sampling
    # transformers' own save writes what it was given (its depth decoder settings under depth_decoder_)
    model.depth_decoder.generation_config.update(do_sample=True, temperature=1.5, top_k=9)
    model.save_pretrained(tmp_path / "resaved")
    assert load_csm(tmp_path / "resaved").sampling == Sampling(0.3, 20, 1.5, 9)
    # a file without sampling keys (transformers derives one from the model config) keeps the CSM reference's
    assert load_csm(src.hf_dir).sampling == Sampling()
    with pytest.raises(ValueError, match="generation_config"):
        export_transformers(src.params, src.cfg, tmp_path / "clash", extra_files={GENERATION_CONFIG: "{}"})
    for text in ("{not json", "[]", '{"do_sample": true, "temperature": 0}', '{"top_k": "many"}'):
        (out / GENERATION_CONFIG).write_text(text)
        with pytest.raises(CheckpointError, match=GENERATION_CONFIG):
            load_csm(out)


def test_cli_export(src: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["export", str(src.hf_dir), str(out), "--dtype", "float16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", GENERATION_CONFIG}
    gen = load_csm(out)
    assert gen.codec is not None and gen.tokenizer is not None and gen.cfg == src.cfg
    assert gen.sampling == load_csm(src.hf_dir).sampling
    for key, value in flat(src.params).items():
        assert np.array_equal(flat(gen.params)[key], value.astype(np.float16).astype(np.float32)), key
    assert main(["export", str(src.hf_dir), str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(src.hf_dir), str(tmp_path / "x"), "--dtype", "int8"])
    assert not (tmp_path / "x").exists()
