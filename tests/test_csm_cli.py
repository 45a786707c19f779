"""`python -m csm_jax.csm`: generate a wav from text (with a context segment) and convert to orbax."""

from __future__ import annotations

import shutil

import numpy as np
import soundfile as sf
from csm_fixtures import get_reference
from tokenizers import Tokenizer, models, pre_tokenizers

import csm_jax
from csm_jax.csm.__main__ import main

CLIP = "tests/data/speech_1s.wav"


def _checkpoint_with_tokenizer(tmp_path_factory):
    src = get_reference("tiny", tmp_path_factory).hf_dir
    dst = tmp_path_factory.mktemp("csm_cli") / "ckpt"
    shutil.copytree(src, dst)
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2}
    for word in "[ ] 0 1 hello there how are you hi".split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.save(str(dst / "tokenizer.json"))
    return dst


def test_generate_and_convert(tmp_path_factory, tmp_path):
    ckpt = _checkpoint_with_tokenizer(tmp_path_factory)
    args = ["--text", "hello there", "--max-audio-ms", "800", "--top-k", "5", "--seed", "3",
            "--context", f"1:hi how are you:{CLIP}"]
    out = tmp_path / "a.wav"
    assert main(["generate", "--checkpoint", str(ckpt), "--out", str(out), *args]) == 0
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24_000 and len(audio) % 1920 == 0 and 0 < len(audio) <= 10 * 1920

    gen = csm_jax.load_csm(ckpt)
    context = [csm_jax.Segment(1, "hi how are you", csm_jax.load_audio(CLIP))]
    expected = gen.generate("hello there", 0, context, max_audio_ms=800, top_k=5, seed=3)
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1.5 / 32768)  # PCM16 rounding

    converted = tmp_path / "converted"
    assert main(["convert", str(ckpt), str(converted)]) == 0
    assert {"params", "codec", "tokenizer.json", "csm_jax.json"} <= {p.name for p in converted.iterdir()}
    out2 = tmp_path / "b.wav"
    assert main(["generate", "--checkpoint", str(converted), "--out", str(out2), *args]) == 0
    np.testing.assert_array_equal(sf.read(out2, dtype="float32")[0], audio)


def test_voice_presets_through_the_cli(tmp_path_factory, tmp_path, capsys):
    ckpt = _checkpoint_with_tokenizer(tmp_path_factory)
    assert main(["voice", str(ckpt), "default", "--turn", f"hi there:{CLIP}", "--turn", f"how are you:{CLIP}"]) == 0
    assert "voices: ['default']" in capsys.readouterr().out
    gen = csm_jax.load_csm(ckpt)
    clip = csm_jax.load_audio(CLIP)
    preset = [csm_jax.Segment(0, "hi there", clip), csm_jax.Segment(0, "how are you", clip)]
    args = ["--checkpoint", str(ckpt), "--text", "hello there", "--max-audio-ms", "800", "--seed", "3", "--top-k", "5"]
    # the default preset prompts speaker 0 as those two turns given as context would; --no-voice leaves it out
    for extra, context in (([], preset), (["--no-voice"], [])):
        out = tmp_path / "v.wav"
        assert main(["generate", "--out", str(out), *args, *extra]) == 0
        expected = gen.generate("hello there", 0, context, max_audio_ms=800, top_k=5, seed=3, voice=None)
        np.testing.assert_allclose(sf.read(out, dtype="float32")[0], np.clip(expected, -1, 1), atol=1.5 / 32768)
    # convert and export carry the presets along
    for command in ("convert", "export"):
        assert main([command, str(ckpt), str(tmp_path / command)]) == 0
        moved = csm_jax.load_csm(tmp_path / command).voices["default"]
        assert [t for t, _ in moved.turns] == ["hi there", "how are you"]
        np.testing.assert_allclose(moved.turns[1][1], gen.voices["default"].turns[1][1], atol=1e-6)
    capsys.readouterr()
    for argv, needle in ((["voice", str(ckpt), "bad name", "--turn", f"hi:{CLIP}"], "voice name"),
                         (["voice", str(ckpt), "x", "--turn", "no-colon"], "transcript:path.wav"),
                         (["voice", str(tmp_path / "nope"), "x", "--turn", f"hi:{CLIP}"], "not a model directory"),
                         (["generate", "--out", str(tmp_path / "x.wav"), *args, "--voice", "nobody"], "unknown voice")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (argv, err)


def test_export_bundles_a_codec_with_another_decoder_only(tmp_path_factory, tmp_path, capsys):
    """`export --codec`: a codec whose decoder was fine-tuned (same codes) replaces SRC's; one that encodes
    differently is refused, since the CSM was trained on the other codes."""
    import jax

    ckpt = _checkpoint_with_tokenizer(tmp_path_factory)
    codec = csm_jax.load_csm(ckpt).codec

    def changed(module: str) -> csm_jax.MimiCodec:
        params = dict(codec.params)
        params[module] = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.01, params[module])
        return csm_jax.MimiCodec(params, codec.config)

    decoder, encoder = changed("decoder").save(tmp_path / "dec"), changed("encoder").save(tmp_path / "enc")
    assert codec.code_differences(csm_jax.load_codec(decoder)) == []
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--codec", str(decoder), "--dtype", "float16"]) == 0
    bundled = csm_jax.load_csm(tmp_path / "out").codec
    assert bundled.code_differences(codec) == []  # a float16 round trip of the same encoder still matches
    got, want = (jax.tree_util.tree_leaves(c.params["decoder"]) for c in (bundled, csm_jax.load_codec(decoder)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)  # the new decoder, through float16
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "bad"), "--codec", str(encoder)]) == 2
    err = capsys.readouterr().err
    assert "makes other codes" in err and "encoder/" in err and not (tmp_path / "bad").exists()


def test_errors_exit_2_with_a_message(tmp_path_factory, tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint_with_tokenizer(tmp_path_factory)
    monkeypatch.delenv("CSM_JAX_CSM", raising=False)
    cases = [
        (["generate", "--checkpoint", str(tmp_path / "nope"), "--text", "hi", "--out", str(tmp_path / "x.wav")],
         "no such checkpoint"),
        (["generate", "--checkpoint", str(ckpt), "--text", "  ", "--out", str(tmp_path / "x.wav")], "non-empty"),
        (["generate", "--checkpoint", str(ckpt), "--text", "hi", "--out", str(tmp_path / "x.wav"),
          "--context", "one:hi"], "speaker:transcript:path.wav"),
        (["generate", "--checkpoint", str(ckpt), "--text", "hi", "--out", str(tmp_path / "x.wav"),
          "--context", f"1:hi:{tmp_path / 'missing.wav'}"], "not found"),
        (["generate", "--checkpoint", str(ckpt), "--text", "hi", "--out", str(tmp_path / "x.wav"),
          "--temperature", "0"], "temperature"),
        (["generate", "--checkpoint", str(ckpt), "--text", "hi", "--out", str(tmp_path / "no" / "x.wav")],
         "does not exist"),
    ]
    capsys.readouterr()  # what building the checkpoint printed (transformers' progress bars)
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (argv, err)
    assert not (tmp_path / "x.wav").exists()


def test_converted_checkpoint_of_the_first_layout_still_loads(tmp_path_factory, tmp_path):
    """Checkpoints converted before the current parameter layout (no layout entry in csm_jax.json; separate
    q/k/v/gate/up projections with kernels [in, out]) load to the same parameters as the source checkpoint."""
    import jax

    from csm_jax import checkpoint
    from csm_jax.csm.weights import load_csm_params
    from csm_jax.weights import read_safetensors

    src = get_reference("tiny", tmp_path_factory).hf_dir
    params, cfg = load_csm_params(src)
    hf = read_safetensors(src / "model.safetensors", exclude="codec_model.")

    def stack(theirs: str, n_layers: int) -> dict:
        tree = {"norm": {"scale": hf[f"{theirs}.norm.weight"]}}
        for i in range(n_layers):
            t = f"{theirs}.layers.{i}"
            tree[f"layers_{i}"] = {
                "self_attn": {f"{p}_proj": {"kernel": hf[f"{t}.self_attn.{p}_proj.weight"].T} for p in "qkvo"},
                "mlp": {f"{p}_proj": {"kernel": hf[f"{t}.mlp.{p}_proj.weight"].T} for p in ("gate", "up", "down")},
                "input_layernorm": {"scale": hf[f"{t}.input_layernorm.weight"]},
                "post_attention_layernorm": {"scale": hf[f"{t}.post_attention_layernorm.weight"]},
            }
        return tree

    old = {"text_embeddings": hf["embed_text_tokens.weight"],
           "audio_embeddings": hf["depth_decoder.model.embed_tokens.weight"],
           "projection": hf["depth_decoder.model.inputs_embeds_projector.weight"].T,
           "codebook0_head": hf["lm_head.weight"].T, "audio_head": hf["depth_decoder.codebooks_head.weight"],
           "backbone": stack("backbone_model", cfg.backbone.num_layers),
           "decoder": stack("depth_decoder.model", cfg.decoder.num_layers)}
    checkpoint.save(tmp_path / "old", old, "csm", cfg.to_dict())
    restored, restored_cfg = load_csm_params(tmp_path / "old")
    assert restored_cfg == cfg
    want = jax.tree_util.tree_leaves_with_path(params)
    got = jax.tree_util.tree_leaves_with_path(restored)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
