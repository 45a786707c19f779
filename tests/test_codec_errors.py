"""Bad checkpoints and bad inputs fail loudly, with a message that says what is wrong, and nothing half-loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mimi_fixtures import FRAME, MimiReference, clip, full_ref, tiny_codec, tiny_ref  # noqa: F401  (fixtures)
from safetensors.numpy import load_file, save_file

import csm_jax
from csm_jax import CheckpointError
from csm_jax.codec import StreamDecoder, StreamEncoder


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` (or `path` itself): name -> (size, mtime_ns)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def assert_load_fails(
    path: Path, match: str, exc: type[Exception] = CheckpointError, **kwargs: Any
) -> pytest.ExceptionInfo:
    """load_codec raises (so nothing is returned: no half-loaded codec) and leaves the checkpoint untouched."""
    before = _snapshot(path)
    result = None
    with pytest.raises(exc, match=match) as info:
        result = csm_jax.load_codec(path, **kwargs)
    assert result is None
    assert _snapshot(path) == before
    return info


@pytest.fixture
def hf_copy(tiny_ref: MimiReference, tmp_path: Path) -> Path:
    """A private copy of the tiny transformers directory, free to damage."""
    return Path(shutil.copytree(tiny_ref.hf_dir, tmp_path / "hf"))


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))
    return dst


def _damaged(tiny_ref: MimiReference, tmp_path: Path, fmt: str, edit: Any) -> tuple[Path, dict[str, Any]]:
    """A tiny checkpoint in format `fmt` with `edit` applied to its tensors; returns (path, load kwargs)."""
    if fmt == "hf":
        d = Path(shutil.copytree(tiny_ref.hf_dir, tmp_path / "hf"))
        _rewrite(tiny_ref.hf_dir / "model.safetensors", d / "model.safetensors", edit)
        return d, {}
    path = _rewrite(tiny_ref.moshi_file, tmp_path / "moshi.safetensors", edit)
    return path, {"config": tiny_ref.config.to_dict()}


# a SEANet conv and a transformer tensor, named as each format spells them
KEYS = {
    "hf": ("encoder.layers.3.conv.weight", "decoder_transformer.layers.0.mlp.fc1.weight"),
    "moshi": ("encoder.model.3.conv.conv.weight", "decoder_transformer.transformer.layers.0.linear1.weight"),
}


# ------------------------------------------------------------------------------------- checkpoints ---
def test_nonexistent_path(tmp_path: Path) -> None:
    assert_load_fails(tmp_path / "no" / "such" / "mimi", match="no such checkpoint")


def test_directory_without_weights(tmp_path: Path) -> None:
    assert_load_fails(tmp_path, match="no model.safetensors")


def test_directory_with_config_but_no_weights(tiny_ref: MimiReference, tmp_path: Path) -> None:
    shutil.copy(tiny_ref.hf_dir / "config.json", tmp_path / "config.json")
    assert_load_fails(tmp_path, match="no model.safetensors")


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "bad_header"])
@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_corrupt_safetensors(tiny_ref: MimiReference, hf_copy: Path, tmp_path: Path, fmt: str, damage: str) -> None:
    good = (tiny_ref.hf_dir / "model.safetensors" if fmt == "hf" else tiny_ref.moshi_file).read_bytes()
    data = {
        "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "bad_header": good[:8] + b"{not json" + good[17:],
    }[damage]
    target = hf_copy / "model.safetensors" if fmt == "hf" else tmp_path / "moshi.safetensors"
    target.write_bytes(data)
    path = hf_copy if fmt == "hf" else target
    kwargs = {} if fmt == "hf" else {"config": tiny_ref.config.to_dict()}
    assert_load_fails(path, match=rf"cannot read safetensors file .*{re.escape(target.name)}", **kwargs)


def test_not_a_mimi_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(path))
    assert_load_fails(path, match="not a Mimi checkpoint")


@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_missing_tensor_is_named(tiny_ref: MimiReference, tmp_path: Path, fmt: str) -> None:
    conv, linear = KEYS[fmt]
    path, kwargs = _damaged(tiny_ref, tmp_path, fmt, lambda t: (t.pop(conv), t.pop(linear)))
    info = assert_load_fails(path, match=rf"missing tensor '{re.escape(conv)}'", **kwargs)
    assert f"missing tensor '{linear}'" in str(info.value)  # every problem is listed, not just the first


@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_missing_attention_tensor_is_named(tiny_ref: MimiReference, tmp_path: Path, fmt: str) -> None:
    key = {"hf": "encoder_transformer.layers.0.self_attn.k_proj.weight",
           "moshi": "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight"}[fmt]
    path, kwargs = _damaged(tiny_ref, tmp_path, fmt, lambda t: t.pop(key))
    assert_load_fails(path, match=rf"missing tensor '{re.escape(key)}'", **kwargs)


@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_extra_tensor_is_named(tiny_ref: MimiReference, tmp_path: Path, fmt: str) -> None:
    extra = "encoder.layers.99.conv.weight" if fmt == "hf" else "encoder.model.99.conv.conv.weight"

    def add(t: dict) -> None:
        t[extra] = np.ones((3, 2, 1), np.float32)

    path, kwargs = _damaged(tiny_ref, tmp_path, fmt, add)
    assert_load_fails(path, match=rf"unexpected tensor '{re.escape(extra)}'", **kwargs)


@pytest.mark.parametrize("fmt", ["hf", "moshi"])
def test_misshaped_tensor_names_tensor_and_both_shapes(tiny_ref: MimiReference, tmp_path: Path, fmt: str) -> None:
    conv, linear = KEYS[fmt]

    def reshape(t: dict) -> None:
        assert t[conv].shape == (8, 4, 8)  # tiny encoder conv 3: [out, in, k]
        t[conv] = np.zeros((8, 5, 8), np.float32)

    path, kwargs = _damaged(tiny_ref, tmp_path, fmt, reshape)
    info = assert_load_fails(path, match=re.escape(conv), **kwargs)
    msg = str(info.value)
    assert re.search(r"[\[(]8, 5, 8[\])]", msg), msg  # the shape found
    assert re.search(r"[\[(]8, 4, 8[\])]", msg), msg  # the shape expected


def test_non_finite_weights_are_rejected(tiny_ref: MimiReference, tmp_path: Path) -> None:
    key = "decoder.layers.0.conv.bias"

    def poison(t: dict) -> None:
        t[key] = t[key].copy()
        t[key][0] = np.nan

    path, kwargs = _damaged(tiny_ref, tmp_path, "hf", poison)
    assert_load_fails(path, match=r"non-finite", **kwargs)


def test_moshi_file_of_other_architecture_without_config(tiny_ref: MimiReference) -> None:
    """A moshi file carries no config: loading the tiny one as the official architecture names misfits."""
    misfit = r"'decoder\.model\.0\.conv\.conv\.weight' has shape \[64, 16, 7\], expected \[1024, 512, 7\]"
    assert_load_fails(tiny_ref.moshi_file, match=r"does not fit the Mimi config(.|\n)*" + misfit)


@pytest.mark.parametrize(
    "config_text, match",
    [
        ("{not json", r"config\.json"),
        ("", r"config\.json"),
        (None, r"config\.json"),  # config.json deleted
        ('{"model_type": "bert"}', r"config\.json.*not a Mimi config"),
        ('{"model_type": "mimi", "pad_mode": "reflect"}', r"config\.json.*pad_mode"),
    ],
    ids=["invalid_json", "empty", "missing", "wrong_model_type", "bad_value"],
)
def test_broken_config_json(hf_copy: Path, config_text: str | None, match: str) -> None:
    config = hf_copy / "config.json"
    if config_text is None:
        config.unlink()
    else:
        config.write_text(config_text)
    assert_load_fails(hf_copy, match=match)


def test_config_json_that_does_not_fit_the_weights(hf_copy: Path) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    config["num_filters"] = 8  # the weights have 4
    (hf_copy / "config.json").write_text(json.dumps(config))
    misfit = r"'decoder\.layers\.0\.conv\.weight' has shape \[64, 16, 7\], expected \[128, 16, 7\]"
    assert_load_fails(hf_copy, match=r"does not fit(.|\n)*" + misfit)


@pytest.mark.parametrize("n", [0, -1, 5])
def test_num_codebooks_out_of_range_tiny(tiny_ref: MimiReference, n: int) -> None:
    assert_load_fails(tiny_ref.hf_dir, match=r"num_codebooks must be in 1\.\.4", exc=ValueError, num_codebooks=n)


@pytest.mark.full_size
def test_num_codebooks_above_32_full(full_ref: MimiReference) -> None:
    assert_load_fails(full_ref.hf_dir, match=r"num_codebooks must be in 1\.\.32", exc=ValueError, num_codebooks=33)


# ------------------------------------------------------------------------------------------- audio ---
@pytest.mark.parametrize(
    "audio, exc, match",
    [
        (np.zeros((1, FRAME), np.int16), TypeError, r"float.*int16"),
        (np.zeros((1, FRAME), np.int32), TypeError, r"float.*int32"),
        (np.zeros((1, FRAME), bool), TypeError, r"float"),
        (np.zeros((1, 1, FRAME), np.float32), ValueError, r"shape.*\[1, 1, 1920\]"),
        (np.float32(0.5), ValueError, r"shape"),
        (np.zeros((1, 0), np.float32), ValueError, r"empty"),
        (np.zeros((0,), np.float32), ValueError, r"empty"),
        (np.full((1, FRAME), np.nan, np.float32), ValueError, r"NaN"),
        (np.where(np.arange(FRAME) == 7, np.inf, 0.0).astype(np.float32)[None], ValueError, r"infinite"),
    ],
    ids=["int16", "int32", "bool", "3d", "scalar", "empty", "empty_1d", "nan", "inf"],
)
def test_bad_audio(tiny_codec: csm_jax.MimiCodec, audio: np.ndarray, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny_codec.encode(audio)


def test_single_nan_sample_is_caught(tiny_codec: csm_jax.MimiCodec) -> None:
    x = clip("speech_1s")[None].copy()
    x[0, 12345] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny_codec.encode(x)


# ------------------------------------------------------------------------------------------- codes ---
@pytest.mark.parametrize(
    "codes, exc, match",
    [
        (np.zeros((1, 4, 3), np.float32), TypeError, r"integer.*float32"),
        (np.zeros((4, 3), np.int32), ValueError, r"shape.*\[4, 3\]"),
        (np.zeros((1, 1, 4, 3), np.int32), ValueError, r"shape"),
        (np.full((1, 4, 3), -1, np.int32), ValueError, r"\[0, 16\).*-1"),
        (np.full((1, 4, 3), 16, np.int64), ValueError, r"\[0, 16\).*16"),
        (np.zeros((1, 5, 3), np.int32), ValueError, r"5 codebooks"),
        (np.zeros((1, 0, 3), np.int32), ValueError, r"0 codebooks"),
        (np.zeros((1, 4, 0), np.int32), ValueError, r"empty"),
    ],
    ids=["float", "2d", "4d", "negative", "too_large", "too_many_codebooks", "no_codebooks", "no_frames"],
)
def test_bad_codes(tiny_codec: csm_jax.MimiCodec, codes: np.ndarray, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tiny_codec.decode(codes)


def test_one_bad_code_among_many_is_caught(tiny_codec: csm_jax.MimiCodec) -> None:
    codes = np.zeros((2, 4, 20), np.int32)
    codes[1, 3, 17] = 16
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tiny_codec.decode(codes)


# ---------------------------------------------------------------------------------------- streaming ---
@pytest.fixture(scope="module")
def encoder(tiny_codec: csm_jax.MimiCodec) -> StreamEncoder:
    return tiny_codec.stream_encoder(2)


@pytest.fixture(scope="module")
def decoder(tiny_codec: csm_jax.MimiCodec) -> StreamDecoder:
    return tiny_codec.stream_decoder(2)


@pytest.mark.parametrize(
    "chunk, exc, match",
    [
        (np.zeros((2, FRAME - 1), np.float32), ValueError, r"shape \[2, 1920\].*\[2, 1919\]"),
        (np.zeros((2, 2 * FRAME), np.float32), ValueError, r"shape \[2, 1920\].*\[2, 3840\]"),
        (np.zeros((1, FRAME), np.float32), ValueError, r"shape \[2, 1920\].*\[1, 1920\]"),
        (np.zeros((3, FRAME), np.float32), ValueError, r"shape \[2, 1920\].*\[3, 1920\]"),
        (np.zeros((FRAME,), np.float32), ValueError, r"shape \[2, 1920\]"),
        (np.zeros((2, FRAME), np.int16), TypeError, r"float"),
        (np.full((2, FRAME), np.nan, np.float32), ValueError, r"NaN"),
    ],
    ids=["short", "long", "batch_1", "batch_3", "1d", "int16", "nan"],
)
def test_bad_stream_encoder_step(encoder: StreamEncoder, chunk: np.ndarray, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        encoder.step(chunk)


@pytest.mark.parametrize(
    "codes, exc, match",
    [
        (np.zeros((1, 4), np.int32), ValueError, r"2 streams"),
        (np.zeros((3, 4), np.int32), ValueError, r"2 streams"),
        (np.zeros((2, 4, 1), np.int32), ValueError, r"shape \[B, K\]"),
        (np.zeros((2, 5), np.int32), ValueError, r"5 codebooks"),
        (np.zeros((2, 4), np.float32), TypeError, r"integer"),
        (np.full((2, 4), 16, np.int32), ValueError, r"\[0, 16\)"),
    ],
    ids=["batch_1", "batch_3", "3d", "too_many_codebooks", "float", "out_of_range"],
)
def test_bad_stream_decoder_step(decoder: StreamDecoder, codes: np.ndarray, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        decoder.step(codes)


def test_rejected_steps_do_not_advance_the_stream(tiny_codec: csm_jax.MimiCodec, encoder: StreamEncoder) -> None:
    """The shared stream saw only rejected steps (above, in file order), so it still encodes like a fresh one."""
    x = np.stack([clip("speech_1s")[: 3 * FRAME], clip("speech_3s")[: 3 * FRAME]])
    got = np.stack([np.asarray(encoder.step(x[:, t * FRAME : (t + 1) * FRAME])) for t in range(3)], -1)
    np.testing.assert_array_equal(got, np.asarray(tiny_codec.encode(x)))


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_bad_stream_batch_size(tiny_codec: csm_jax.MimiCodec, batch_size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        tiny_codec.stream_encoder(batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_codec.stream_decoder(batch_size)

