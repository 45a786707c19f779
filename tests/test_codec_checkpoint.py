"""Converted (orbax) codec checkpoints: `codec.save(dir)` -> `load_codec(dir)` round trip, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.traverse_util
import numpy as np
import pytest
from mimi_fixtures import (  # noqa: F401  (fixtures)
    MimiReference,
    clip,
    frac_equal,
    get_codec,
    get_reference,
    max_abs_diff,
    tiny_codec,
    tiny_ref,
)

import csm_jax
from csm_jax import CheckpointError


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny codec loaded from its moshi file (non-default architecture given by `config=`), saved."""
    codec = get_codec("tiny", "moshi", tmp_path_factory)
    return codec.save(tmp_path_factory.mktemp("saved") / "tiny_mimi")


def _round_trip(ref: MimiReference, original: csm_jax.MimiCodec, restored: csm_jax.MimiCodec) -> None:
    x = clip("speech_1s")[None]  # shapes the session has compiled already for `original`
    codes = np.asarray(original.encode(x))
    np.testing.assert_array_equal(np.asarray(restored.encode(x)), codes)
    np.testing.assert_array_equal(np.asarray(restored.decode(codes)), np.asarray(original.decode(codes)))
    # and the restored codec is still the reference codec
    assert frac_equal(np.asarray(restored.encode(x)), ref.encode(x)) >= 0.999
    assert max_abs_diff(np.asarray(restored.decode(codes)), ref.decode(codes)) <= 1e-4


def test_tiny_round_trip(saved_tiny: Path, tiny_ref: MimiReference, tmp_path_factory: pytest.TempPathFactory) -> None:
    original = get_codec("tiny", "moshi", tmp_path_factory)
    restored = csm_jax.load_codec(saved_tiny)  # no config=: it is stored with the checkpoint
    assert restored.config == original.config
    assert restored.num_codebooks == original.num_codebooks == 4
    assert (restored.sample_rate, restored.frame_size) == (24_000, 1920)
    _round_trip(tiny_ref, original, restored)


def test_round_trip_with_fewer_codebooks(saved_tiny: Path, tiny_ref: MimiReference) -> None:
    restored = csm_jax.load_codec(saved_tiny, num_codebooks=2)
    assert restored.num_codebooks == 2
    x = clip("speech_1s")[None]
    assert frac_equal(np.asarray(restored.encode(x)), tiny_ref.encode(x, num_quantizers=2)) >= 0.999


@pytest.mark.full_size
def test_full_round_trip(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Full size (96 M parameters): every restored parameter is bit-identical, under the same tree paths."""
    original = get_codec("full", "hf", tmp_path_factory)
    restored = csm_jax.load_codec(original.save(tmp_path / "full_mimi"))
    assert restored.config == original.config and restored.num_codebooks == 32
    want = flax.traverse_util.flatten_dict(original.params)
    got = flax.traverse_util.flatten_dict(restored.params)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=str(key))


def test_save_creates_missing_parents(tiny_codec: csm_jax.MimiCodec, tmp_path: Path) -> None:
    path = tiny_codec.save(tmp_path / "a" / "b" / "mimi")
    assert Path(path).is_dir() and csm_jax.load_codec(path).config == tiny_codec.config


def test_save_into_existing_empty_directory(tiny_codec: csm_jax.MimiCodec, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    path = tiny_codec.save(tmp_path / "empty")
    assert csm_jax.load_codec(path).config == tiny_codec.config


def test_save_refuses_non_empty_directory(tiny_codec: csm_jax.MimiCodec, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        tiny_codec.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_refuses_to_overwrite_a_checkpoint(saved_tiny: Path, tiny_codec: csm_jax.MimiCodec) -> None:
    before = sorted((str(p), p.stat().st_mtime_ns) for p in saved_tiny.rglob("*"))
    with pytest.raises(CheckpointError, match="not empty"):
        tiny_codec.save(saved_tiny)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in saved_tiny.rglob("*")) == before


@pytest.fixture
def saved_copy(saved_tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_tiny, tmp_path / "copy"))


def _meta_file(path: Path) -> Path:
    (meta,) = [p for p in path.iterdir() if p.suffix == ".json"]
    return meta


def test_wrong_kind_is_rejected(saved_copy: Path) -> None:
    meta_file = _meta_file(saved_copy)
    meta = json.loads(meta_file.read_text())
    meta["kind"] = "csm"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'csm'.*'mimi'"):
        csm_jax.load_codec(saved_copy)


def test_corrupt_metadata_is_rejected(saved_copy: Path) -> None:
    _meta_file(saved_copy).write_text("{oops")
    with pytest.raises(CheckpointError, match="cannot read"):
        csm_jax.load_codec(saved_copy)


def test_missing_parameters_are_rejected(saved_copy: Path) -> None:
    for p in saved_copy.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
    with pytest.raises(CheckpointError, match="cannot restore"):
        csm_jax.load_codec(saved_copy)


@pytest.mark.parametrize(
    "change",
    [{"num_filters": 8}, {"num_quantizers": 3}, {"codebook_size": 8}],
    ids=["num_filters", "num_quantizers", "codebook_size"],
)
def test_config_that_does_not_fit_the_saved_parameters(saved_copy: Path, change: dict) -> None:
    """Restoring with `config=` of another architecture must fail at load, not return a codec whose parameters
    have the saved shapes but whose config says otherwise (which later crashes or encodes silently wrong)."""
    wrong = csm_jax.load_codec(saved_copy).config.replace(**change)
    with pytest.raises(CheckpointError, match=r"(?i)shape|fit|restore"):
        csm_jax.load_codec(saved_copy, config=wrong)
