"""The built-in default voice: shipped as package data, loaded by `default_generator`, and served by the main
command (`python -m serve` with no model given) over the real WebSocket protocol.

The served audio is scored as the voice evaluation scores it (`csm_jax.evaluation`): sentences of the corpus
grammar that no training conversation says (`grammar.heldout`), recognised by pocketsphinx with a language model
of the grammar's text, against eSpeak NG's own rendering of the same sentences through the same recogniser.
"""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from serve_fixtures import Client, LiveServer, run, start_server_process

from csm_jax import Segment
from csm_jax.audio import load_audio
from csm_jax.data.grammar import dialogue, heldout
from csm_jax.data.synth import Voice, synthesise
from csm_jax.default_model import NAME, VOICE_DIR, default_generator
from csm_jax.evaluation.intelligibility import Intelligibility, word_error_rate

SENTENCES = heldout(200)[:8]
MAX_WEIGHTS_BYTES = 50 * 2**20


@pytest.fixture(scope="module")
def voice_server(tmp_path_factory: pytest.TempPathFactory, xla_cache: Path) -> Iterator[LiveServer]:
    """The main job as a user starts it: no model named (the built-in voice)."""
    server = start_server_process(tmp_path_factory.mktemp("voice-server"), xla_cache, "model.random_seed=null",
                                  "engine.warmup_rows=64", "engine.batch_size=2", "transcriber.backend=none")
    yield server
    server.stop()


def test_the_voice_ships_as_package_data_with_its_model_card() -> None:
    files = {p.name for p in VOICE_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "prompt.json", "generation_config.json",
            "voices.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in VOICE_DIR.rglob("*") if p.is_file()) <= MAX_WEIGHTS_BYTES
    card = (VOICE_DIR / "MODEL_CARD.md").read_text()
    for command in ("train/make_corpus.py", "train/train_codec.py", "train/prepare.py", "train/train.py",
                    "train/evaluate_voice.py"):
        assert command in card, command

    gen = default_generator()
    csm_params = sum(x.size for x in jax.tree.leaves(gen.params))
    codec_params = sum(x.size for x in jax.tree.leaves(gen.codec.params))
    assert csm_params <= 40e6 and codec_params <= 10e6, (csm_params, codec_params)
    assert gen.prompt_format().frontend.name == "espeak:en-us"
    assert gen.num_codebooks == gen.codec.num_codebooks == 8

    # its default voice preset holds training utterances, none of them an evaluation sentence, and it prompts a
    # speaker exactly as those utterances given as context would, until the speaker's own audio is in the context
    preset = gen.voices["default"]
    assert all(text not in heldout(200) and 1.0 < audio.size / 24_000 < 10.0 for text, audio in preset.turns)
    as_context = [Segment(0, text, audio) for text, audio in preset.turns]
    for got, want in zip(gen.prompt("Good.", 0), gen.prompt("Good.", 0, as_context, voice=None)):
        np.testing.assert_array_equal(got, want)
    other = [Segment(1, "Hi.", preset.turns[0][1][:24_000])]
    for got, want in zip(gen.prompt("Good.", 0, other), gen.prompt("Good.", 0, as_context + other, voice=None)):
        np.testing.assert_array_equal(got, want)
    mine = [Segment(0, "Hi.", preset.turns[0][1][:24_000])]
    for got, want in zip(gen.prompt("Good.", 0, mine), gen.prompt("Good.", 0, mine, voice=None)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"unknown voice 'nobody'.*\['default'\]"):
        gen.prompt("Good.", 0, voice="nobody")


def test_the_voice_recipe_describes_the_shipped_checkpoint() -> None:
    """`experiment=voice` trains the shipped architecture, on the codes of the codec bundled with it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from csm_jax import experiment
    from csm_jax.codec import MimiConfig, load_codec
    from csm_jax.csm.config import CsmConfig

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=voice"])
    cfg = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "codec", "data", "train")}
    shipped = CsmConfig.from_hf(json.loads((VOICE_DIR / "config.json").read_text()))
    assert experiment.model_config(cfg) == shipped and shipped.context_codebooks == 8

    cfg["codec"]["path"] = str(root / cfg["codec"]["path"])
    codec = experiment.codec(cfg)
    assert codec.config == MimiConfig.from_dict(cfg["codec"]["config"])  # what train_codec.py trains
    bundled = load_codec(VOICE_DIR)  # the codec inside the shipped CSM directory
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(codec.params), jax.tree.leaves(bundled.params)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-3, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))  # the bundled copy is float16
    assert cfg["data"]["loader"]["target_turns"] == "last" and cfg["train"]["loss"]["depth_fraction"] == 0.5


def test_the_main_command_speaks_with_the_default_voice(voice_server: LiveServer, tmp_path: Path) -> None:
    health = json.loads(urllib.request.urlopen(voice_server.http_url + "health").read())
    assert health["model"] == NAME

    async def go() -> tuple[dict, list[tuple[dict, dict, list[bytes]]], dict, dict]:
        c = await Client.open(voice_server.ws_url)
        await c.start()
        out = []
        for i, text in enumerate(SENTENCES):  # one conversation, as a user types into the page
            out.append(await c.say(text, speaker=0, seed=i, max_audio_ms=10_000))
        bad = await c.request({"type": "say", "text": "Hi.", "speaker": 0, "voice": "nobody"})
        await c.start()
        plain, _, _ = await c.say("Hi.", speaker=0, voice=None, max_audio_ms=160)
        await c.close()
        return c.ready, out, bad, plain

    ready, responses, bad, plain = run(go())
    # requests that leave sampling out get the voice's own (its generation_config.json), not the CSM reference's
    voice = json.loads((VOICE_DIR / "generation_config.json").read_text())
    assert (ready["defaults"]["temperature"], ready["defaults"]["top_k"]) == (voice["temperature"], voice["top_k"])
    # the voice preset speaks the first turn; from then on the conversation's own audio carries the voice
    assert ready["voices"] == ["default"] and ready["defaults"]["voice"] == "default"
    assert [started["voice"] for started, _, _ in responses] == ["default"] + [None] * (len(SENTENCES) - 1)
    # the context window is the one the model was trained with (its prompt.json: 2 turns), not a server default
    window = json.loads((VOICE_DIR / "prompt.json").read_text())["max_context_turns"]
    assert [started["context_turns"] for started, _, _ in responses] == [min(i, window) for i in range(len(SENTENCES))]
    assert plain["voice"] is None and plain["prompt_rows"] < responses[0][0]["prompt_rows"]
    assert bad["type"] == "error" and bad["code"] == "bad_field" and "['default']" in bad["message"], bad
    responses = [(done, frames) for _, done, frames in responses]
    # the HTTP speech API names the preset as OpenAI clients name a voice: the same prompt, so the same audio
    body = {"model": "csm-jax", "input": SENTENCES[0], "voice": "default", "response_format": "pcm", "seed": 0}
    post = urllib.request.Request(voice_server.http_url + "v1/audio/speech", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=120) as r:
        assert r.read() == b"".join(responses[0][1])
    audio = [np.frombuffer(b"".join(frames), "<i2").astype(np.float32) / 32768 for _, frames in responses]
    refs = [load_audio(synthesise(Voice("espeak-ng", "en-us"), text, tmp_path / f"ref_{i}.wav"))
            for i, text in enumerate(SENTENCES)]
    rng, used = random.Random(0), set(SENTENCES)
    corpus_text = [line for _ in range(300) for line in dialogue(rng, 3, used)]
    asr = Intelligibility([*corpus_text, *SENTENCES])
    wer = word_error_rate(SENTENCES, [asr.transcribe(a) for a in audio])
    wer_ref = word_error_rate(SENTENCES, [asr.transcribe(r) for r in refs])
    ratios = [len(a) / len(r) for a, r in zip(audio, refs)]
    print(f"default voice through the server: WER {wer:.2f} (eSpeak NG {wer_ref:.2f}); durations x{ratios}")
    # it speaks the sentences: most words are recognised (an untrained model scores 1.0 or more)
    assert wer < 0.9, (wer, wer_ref)
    # the model ends its own turns, at about the length eSpeak NG takes for the same sentence
    assert all(done["stop_reason"] == "eos" for done, _ in responses), [d for d, _ in responses]
    assert all(0.5 <= r <= 2.0 for r in ratios), ratios


def test_the_python_client_names_the_voice_preset(voice_server: LiveServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from csm_jax import client

    async def go() -> tuple[list[str | None], str]:
        async with client.Client(voice_server.ws_url) as c:
            await c.start()
            used = [(await c.say("Hi.", 0, voice=False, max_audio_ms=160)).started["voice"],
                    (await c.say("Hi.", 1, voice="default", max_audio_ms=160)).started["voice"],
                    (await c.say("Hi.", 2, max_audio_ms=160)).started["voice"]]  # the server's default
            try:
                await c.say("Hi.", 3, voice="nobody")
            except client.ServerError as e:
                return used, e.code
            return used, "no error"

    assert run(go()) == ([None, "default", "default"], "bad_field")
    out = tmp_path / "hi.wav"
    for flag, want in ((["--voice", "default"], "default"), (["--no-voice"], None)):
        argv = ["say", "--url", voice_server.ws_url, "--text", "Hi.", "--out", str(out), "--max-audio-ms", "160"]
        assert client.main([*argv, *flag, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["voice"] == want


def test_the_cli_speaks_with_the_default_voice_when_no_checkpoint_is_given(tmp_path: Path, monkeypatch) -> None:
    import soundfile as sf

    from csm_jax.csm.__main__ import main

    monkeypatch.delenv("CSM_JAX_CSM", raising=False)
    out = tmp_path / "hello.wav"
    assert main(["generate", "--text", SENTENCES[0], "--out", str(out), "--max-audio-ms", "8000"]) == 0
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24_000 and 0.3 < len(audio) / rate < 8.0  # spoken, and ended before the limit
    assert np.abs(audio).max() > 0.01
