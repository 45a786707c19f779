"""The voice evaluation (csm_jax.evaluation.voice) tells a model that speaks in the prompted voice from one that does
not: stand-in generators that synthesise each sentence with eSpeak NG / flite, in the prompt's voice or always in
one voice, on real synthetic speech."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from csm_jax import load_audio
from csm_jax.csm.sampling import Sampling
from csm_jax.csm.voices import VoicePreset
from csm_jax.data.grammar import heldout
from csm_jax.data.manifest import Utterance
from csm_jax.data.synth import Voice, synthesise
from csm_jax.evaluation.voice import VoiceEvalConfig, evaluate_voice

VOICES = (Voice("espeak-ng", "en-us+m1", 30, 160), Voice("espeak-ng", "en-gb+f2", 85, 170), Voice("flite", "slt"),
          Voice("festival", "voice_kal_diphone"))
PROMPTS = heldout(40, seed=7)  # the voices' own (prompt) utterances
SENTENCES = heldout(12, seed=0)


class Passthrough:
    """A lossless stand-in codec: its rendering of a voice is the voice itself."""

    def resynthesize(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(audio)


class Speaker:
    """Says `text` with a synthesiser: in the voice of its prompt (`follow=True`) or always in VOICES[0]. The
    follower also has a default voice preset: with no context it speaks in VOICES[2]."""

    def __init__(self, voice_of: dict[str, Voice], out: Path, follow: bool) -> None:
        self.voice_of, self.out, self.follow, self.calls = voice_of, out, follow, 0
        self.codec = Passthrough()
        self.voices = {"default": VoicePreset("default", (("Hi.", np.zeros(1920, np.float32)),))} if follow else {}

    def resolve_sampling(self, *given: Any) -> Sampling:
        return Sampling().override(*given)

    def generate(self, text: str, speaker: int, context: Any, max_audio_ms: int, temperature: float | None,
                 top_k: int | None, seed: int, depth_temperature: float | None = None,
                 depth_top_k: int | None = None) -> np.ndarray:
        if not context:  # the default voice preset alone
            assert self.voices and speaker == 0
            voice = VOICES[2]
        else:
            assert speaker == 0 and len(context) == 1 and context[0].speaker == 0 and context[0].audio.ndim == 1
            voice = self.voice_of[context[0].text] if self.follow else VOICES[0]
        self.calls += 1
        return load_audio(synthesise(voice, text, self.out / f"gen_{self.calls}.wav"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Utterance], dict[str, Voice]]:
    root = tmp_path_factory.mktemp("voices")
    utterances, voice_of = [], {}
    for v, voice in enumerate(VOICES):
        for turn in range(2):
            text = PROMPTS[2 * v + turn]
            path = synthesise(voice, text, root / f"v{v}_{turn}.wav")
            utterances.append(Utterance(path, text, v, f"c{v}", turn))
            voice_of[text] = voice
    return utterances, voice_of


@pytest.mark.parametrize("follow", [True, False])
def test_voice_prompting_and_intelligibility_are_measured(follow: bool, held_out: Any, tmp_path: Path) -> None:
    utterances, voice_of = held_out
    gen = Speaker(voice_of, tmp_path, follow)
    cfg = VoiceEvalConfig(sentences=len(SENTENCES), reading_pairs=0, source_pairs=0)  # stand-ins: no model inside
    result = evaluate_voice(gen, SENTENCES, utterances, PROMPTS, cfg, tmp_path / "eval")
    assert gen.calls == len(SENTENCES) * (2 if follow else 1) and result["pairs"] == len(SENTENCES)
    assert result["voices"] == len(VOICES)
    assert (tmp_path / "eval" / "voice_eval.json").is_file()
    assert len(list((tmp_path / "eval").glob("sample_*.wav"))) == len(SENTENCES)
    # Synthesisers speak clearly and end their turns; durations are near eSpeak NG's own.
    assert result["wer_generated"] < 0.5 and result["ended"] == 1.0
    assert 0.5 < result["duration_ratio_median"] < 2.0
    # another utterance of the prompt voice, through a lossless codec, is told apart from the other voice
    assert result["prompting_ceiling"] >= 0.8, result
    # against the codec's renderings of the references: through a lossless codec, the same decisions
    assert result["prompting_accuracy_codec"] == result["prompting_accuracy"]
    assert result["prompting_ceiling_codec"] == result["prompting_ceiling"]
    if follow:
        assert result["prompting_accuracy"] >= 0.8, result["items"]
        assert abs(result["wer_gap"]) < 0.3
        # the default voice alone, scored the same way
        assert result["wer_default_voice"] < 0.5 and result["ended_default_voice"] == 1.0
        assert 0.5 < result["duration_ratio_default_voice"] < 2.0
        assert result["wer_gap_default_voice"] == result["wer_default_voice"] - result["wer_reference"]
    else:  # always the first voice: wrong whenever that voice is the one to tell the prompt from
        assert "wer_default_voice" not in result  # no preset, nothing to measure
        assert result["prompting_accuracy"] < 0.8
        against_first = [it for it in result["items"] if it["other_voice"] == 0]
        assert against_first and not any(it["prompted"] for it in against_first), result["items"]
