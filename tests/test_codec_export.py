"""Export of a codec as a transformers Mimi directory (`csm_jax.codec.export`, `python -m csm_jax.codec export`).

Two small random codecs with non-official sizes are exported; transformers' `MimiModel.from_pretrained` must load
them with no missing or unexpected tensor and encode real speech to the same codes as the codec (100 %) and decode
them to the same audio; `load_codec` must read the export back exactly. The EMA form (real `embed_sum` /
`cluster_usage`) must round-trip, and the command line must refuse a non-empty destination.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import MimiModel

from csm_jax import MimiCodec, load_audio, load_codec
from csm_jax.codec.__main__ import main
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.export import export_transformers, transformers_config
from csm_jax.codec.mimi import Mimi

SPEECH = Path(__file__).parent / "data" / "speech_3s.wav"
AUDIO_ATOL = 1e-4  # decoded audio, absolute, for audio peaking at TARGET_PEAK
TARGET_PEAK = 0.8
CONFIGS = {
    # 2 layers, attention window 16 (< the 77 encoder steps of the clip), non-default RoPE base
    "small": MimiConfig(hidden_size=64, num_filters=8, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                        intermediate_size=128, codebook_dim=32, num_quantizers=8, upsample_groups=64,
                        sliding_window=16, rope_theta=5_000.0),
    # no transformer, 1024-entry codebooks, 2 semantic levels, 6.25 Hz frames (latent stride 4)
    "no_transformer": MimiConfig(hidden_size=128, num_filters=16, num_layers=0, codebook_size=1024, codebook_dim=64,
                                 num_quantizers=6, num_semantic_quantizers=2, upsample_groups=128, frame_rate=6.25),
}


@dataclass
class Exported:
    codec: MimiCodec
    path: Path  # the export
    model: MimiModel  # transformers' load of it
    loading_info: dict[str, Any]


_CACHE: dict[str, Exported] = {}  # one export per config for the whole module


def speech() -> np.ndarray:
    """speech_3s, float32 [1, 76916] (not a whole number of frames)."""
    return load_audio(SPEECH)[None]


def flat(params: Any) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def meaningful_codec(cfg: MimiConfig, seed: int) -> MimiCodec:
    """A random codec whose every parameter matters: layer scales U(0.2, 1), layer norms and biases off their
    init, codebooks fitted to the projected latent of speech (level 0 around its mean over time, every level at
    its spread, so speech uses many codes), and the last decoder conv scaled so decoded speech peaks at
    TARGET_PEAK."""
    rng = np.random.default_rng(seed)
    params = flat(MimiCodec.random(cfg, seed=seed).params)
    for path, value in params.items():
        if path.endswith("_layer_scale/scale"):
            params[path] = rng.uniform(0.2, 1.0, value.shape).astype(np.float32)
        elif path.endswith("layernorm/scale"):
            params[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif path.endswith("bias"):
            params[path] = 0.05 * rng.standard_normal(value.shape).astype(np.float32)
    latent = Mimi(cfg).apply({"params": flax.traverse_util.unflatten_dict(params, sep="/")}, speech(),
                             method=Mimi.encode_latent)[0]  # [T, hidden]
    for half in ("semantic", "acoustic"):
        proj = params.get(f"quantizer/{half}/input_proj/kernel")
        x = np.asarray(latent if proj is None else latent @ proj)
        books = x.std(0) * rng.standard_normal(params[f"quantizer/{half}/codebooks"].shape)
        books[0] += x.mean(0)
        params[f"quantizer/{half}/codebooks"] = books.astype(np.float32)
    codec = MimiCodec(flax.traverse_util.unflatten_dict(params, sep="/"), cfg)
    peak = float(np.abs(np.asarray(codec.decode(codec.encode(speech())))).max())
    last = max({p.split("/")[1] for p in params if p.startswith("decoder/")}, key=lambda n: int(n.split("_")[1]))
    for leaf in ("kernel", "bias"):
        params[f"decoder/{last}/{leaf}"] = params[f"decoder/{last}/{leaf}"] * np.float32(TARGET_PEAK / peak)
    return MimiCodec(flax.traverse_util.unflatten_dict(params, sep="/"), cfg)


def get_exported(name: str, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    if name not in _CACHE:
        codec = meaningful_codec(CONFIGS[name], seed=3)
        path = export_transformers(codec, tmp_path_factory.mktemp(f"export_{name}") / "mimi")
        model, info = MimiModel.from_pretrained(path, output_loading_info=True)
        _CACHE[name] = Exported(codec, path, model.eval(), info)
    return _CACHE[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return get_exported(request.param, tmp_path_factory)


def hf_encode(model: MimiModel, audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(audio)[:, None]).audio_codes.numpy()


def same_tree(a: Any, b: Any) -> bool:
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                      jax.tree_util.tree_leaves(b)))


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- transformers ---
def test_transformers_loads_every_tensor(exported: Exported) -> None:
    info = exported.loading_info
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    cfg, hf = exported.codec.config, exported.model.config
    assert (hf.num_hidden_layers, hf.codebook_size, hf.num_quantizers) == (cfg.num_layers, cfg.codebook_size,
                                                                          cfg.num_quantizers)
    assert (hf.frame_rate, hf.latent_stride, hf.upsample_groups) == (cfg.frame_rate, cfg.latent_stride,
                                                                    cfg.upsample_groups)
    assert not any("weight_g" in k or "parametrizations" in k for k in load_file(exported.path / "model.safetensors"))


def test_transformers_encodes_and_decodes_like_the_codec(exported: Exported) -> None:
    codec, audio = exported.codec, speech()
    ours = np.asarray(codec.encode(audio))
    theirs = hf_encode(exported.model, audio)
    assert ours.shape == theirs.shape == (1, codec.config.num_quantizers, codec.num_frames(audio.shape[-1]))
    np.testing.assert_array_equal(ours, theirs)
    assert min(len(np.unique(level)) for level in ours[0]) >= 5, "degenerate codes would prove little"

    with torch.no_grad():
        want = exported.model.decode(torch.from_numpy(ours.astype(np.int64))).audio_values[:, 0].numpy()
    got = np.asarray(codec.decode(ours))
    assert got.shape == want.shape and np.abs(want).max() > 0.5
    assert float(np.max(np.abs(got - want))) <= AUDIO_ATOL


def test_load_codec_reads_the_export_back_exactly(exported: Exported) -> None:
    loaded = load_codec(exported.path)
    assert loaded.config == exported.codec.config
    assert same_tree(loaded.params, exported.codec.params)


# ------------------------------------------------------------------------------------------- EMA form ---
def ema_codec(base: MimiCodec, seed: int) -> tuple[MimiCodec, dict[str, dict[str, np.ndarray]]]:
    """`base` with codebooks made from an EMA state (usage U(0.5, 3), a few levels' entries unused, below the
    1e-5 clamp), and that state."""
    rng = np.random.default_rng(seed)
    params = flat(base.params)
    ema = {}
    for half in ("semantic", "acoustic"):
        books = params[f"quantizer/{half}/codebooks"]
        usage = rng.uniform(0.5, 3.0, books.shape[:2]).astype(np.float32)
        usage[:, :3] = 0.0
        embed_sum = books * np.maximum(usage, 1e-5)[..., None]
        ema[half] = {"embed_sum": embed_sum, "cluster_usage": usage}
        params[f"quantizer/{half}/codebooks"] = embed_sum / np.maximum(usage, np.float32(1e-5))[..., None]
    return MimiCodec(flax.traverse_util.unflatten_dict(params, sep="/"), base.config), ema


def test_ema_form_round_trips(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    codec, ema = ema_codec(get_exported("small", tmp_path_factory).codec, seed=5)
    path = export_transformers(codec, tmp_path / "mimi", ema={**ema, "initialized": np.bool_(True)})
    tensors = load_file(path / "model.safetensors")
    model, info = MimiModel.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    quantizer = model.eval().quantizer
    for half, rvq in (("semantic", quantizer.semantic_residual_vector_quantizer),
                      ("acoustic", quantizer.acoustic_residual_vector_quantizer)):
        prefix = f"quantizer.{half}_residual_vector_quantizer.layers"
        es, usage = ema[half]["embed_sum"], ema[half]["cluster_usage"]
        for j, layer in enumerate(rvq.layers):
            np.testing.assert_array_equal(tensors[f"{prefix}.{j}.codebook.embed_sum"], es[j])
            np.testing.assert_array_equal(tensors[f"{prefix}.{j}.codebook.cluster_usage"], usage[j])
            effective = layer.codebook.embed.numpy()
            np.testing.assert_allclose(effective, es[j] / np.maximum(usage[j], 1e-5)[:, None], rtol=1e-6)
            np.testing.assert_allclose(effective, np.asarray(codec.params["quantizer"][half]["codebooks"][j]),
                                       rtol=1e-6)
    audio = speech()
    np.testing.assert_array_equal(hf_encode(model, audio), np.asarray(codec.encode(audio)))
    loaded = load_codec(path)
    for half in ("semantic", "acoustic"):
        np.testing.assert_allclose(loaded.params["quantizer"][half]["codebooks"],
                                   codec.params["quantizer"][half]["codebooks"], rtol=1e-6)


@pytest.mark.parametrize("case", ["stale_usage", "missing_half", "wrong_shape"])
def test_bad_ema_is_refused_before_writing(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, case: str
) -> None:
    codec, ema = ema_codec(get_exported("small", tmp_path_factory).codec, seed=5)
    if case == "stale_usage":
        ema["acoustic"]["cluster_usage"] = ema["acoustic"]["cluster_usage"] * 2
        expect = "differ from the codec's codebooks"
    elif case == "missing_half":
        del ema["semantic"]
        expect = "must have the keys"
    else:
        ema["semantic"]["embed_sum"] = ema["semantic"]["embed_sum"][:, :-1]
        expect = "do not fit"
    with pytest.raises(ValueError, match=expect):
        export_transformers(codec, tmp_path / "mimi", ema=ema)
    assert not (tmp_path / "mimi").exists()


@pytest.mark.parametrize(("changes", "expect"), [
    ({"frame_rate": 25.0}, "no down/upsampling"),
    ({"codebook_size": 1000}, "power-of-2"),
    # encoder rate 1.5 Hz: transformers rounds it up to 2 before dividing by the frame rate
    ({"sample_rate": 1500, "ratios": (10, 10, 10), "frame_rate": 0.375}, "= 5, not this codec's 4"),
])
def test_configs_transformers_cannot_build_are_refused(changes: dict[str, Any], expect: str) -> None:
    with pytest.raises(ValueError, match=expect):
        transformers_config(CONFIGS["small"].replace(**changes))


# -------------------------------------------------------------------------------------------------- CLI ---
def test_cli_export_of_a_converted_checkpoint_and_refusal_of_a_non_empty_dir(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = get_exported("small", tmp_path_factory)
    converted = exported.codec.save(tmp_path / "converted")
    dst = tmp_path / "mimi"
    assert main(["export", str(converted), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    src = exported.path  # the same codec exported in-process
    assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    want, got = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    for target in (dst, other):
        before = snapshot(target)
        assert main(["export", str(converted), str(target)]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and "not empty" in err and target.name in err, err
        assert "wrote" not in out and snapshot(target) == before
