"""The reading diagnostic (csm_jax.evaluation.reading): same-voice pairs from a manifest's turns, and the
teacher-forced per-part losses with the own and another text, checked against the trainer's loss on the same rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from csm_jax.audio import load_audio
from csm_jax.csm.prompt import concat
from csm_jax.data.grammar import heldout
from csm_jax.data.manifest import Utterance
from csm_jax.data.synth import Voice, synthesise
from csm_jax.default_model import random_generator
from csm_jax.evaluation.reading import code_source_wer, reading_profile, same_voice_pairs
from csm_jax.training.loss import LossConfig, compute_loss

TEXTS = heldout(8, seed=3)


@pytest.fixture(scope="module")
def turns(tmp_path_factory: pytest.TempPathFactory) -> list[Utterance]:
    """Two conversations of two voices, A B A and B A B."""
    root = tmp_path_factory.mktemp("reading")
    voices = [Voice("espeak-ng", "en-us"), Voice("espeak-ng", "en-gb+f2", 85, 170)]
    out = []
    for c, order in enumerate([(0, 1, 0), (1, 0, 1)]):
        for t, v in enumerate(order):
            text = TEXTS[3 * c + t]
            out.append(Utterance(synthesise(voices[v], text, root / f"c{c}_{t}.wav"), text, v, f"conv{c}", t))
    return out


def test_pairs_are_a_voice_and_its_latest_earlier_turn(turns):
    pairs = same_voice_pairs(list(reversed(turns)))  # file order does not matter
    assert [(p.conversation, p.turn, t.turn) for p, t in pairs] == [("conv0", 0, 2), ("conv1", 0, 2)]
    assert all(p.speaker == t.speaker for p, t in pairs)
    assert len(same_voice_pairs(turns, limit=1)) == 1


def test_profile_matches_the_training_loss_on_the_same_rows(turns):
    gen = random_generator(0)
    pairs = same_voice_pairs(turns)
    others = [u.text for u in turns]
    prof = reading_profile(gen, pairs, others, parts=3, seed=1)
    assert prof["pairs"] == 2 and all(len(prof[k]) == 3 for k in ("nll_own", "nll_other", "gap"))
    np.testing.assert_allclose(prof["gap"], np.subtract(prof["nll_other"], prof["nll_own"]), atol=1e-9)

    # the first pair alone, own text: the mean NLL is the trainer's codebook-0 loss on the target's audio frames
    # (end frame excluded), computed by csm_jax.training.loss on the same rows
    prompt, target = pairs[0]
    fmt = gen.prompt_format()
    audio = gen.audio_rows(load_audio(target.audio))
    tokens, mask = concat([fmt.text_rows(prompt.text, 0), gen.audio_rows(load_audio(prompt.audio)),
                           fmt.text_rows(target.text, 0), audio])
    targets = np.zeros(len(tokens), bool)
    targets[len(tokens) - len(audio[0]): len(tokens) - 1] = True
    batch = {"tokens": tokens[None], "mask": mask[None], "targets": targets[None]}
    _, metrics = compute_loss(gen.params, batch, jax.random.key(0), gen.cfg, LossConfig())
    one = reading_profile(gen, pairs[:1], others, parts=1, seed=1)
    np.testing.assert_allclose(one["nll_own_mean"], float(metrics["c0_loss"]), rtol=1e-5)
    np.testing.assert_allclose(one["nll_own"][0], one["nll_own_mean"], rtol=1e-9)


def test_bad_arguments_are_clear_errors(turns):
    gen = random_generator(0)
    pairs = same_voice_pairs(turns)
    with pytest.raises(ValueError, match="other than the target"):
        reading_profile(gen, pairs[:1], [pairs[0][1].text])
    with pytest.raises(ValueError, match="parts"):
        reading_profile(gen, pairs, TEXTS, parts=0)
    with pytest.raises(ValueError, match="long enough"):
        reading_profile(gen, pairs, TEXTS, parts=10_000)


class _Oracle:
    """A recogniser that hears a turn's text only in the codec's resynthesis of its own codes."""

    def __init__(self, gen, pairs) -> None:
        self.known = []
        for _, target in pairs:
            codes = gen.audio_rows(load_audio(target.audio))[0][:-1, : gen.cfg.num_codebooks]
            self.known.append((np.asarray(gen.codec.decode(codes.T[None]))[0], target.text))

    def transcribe(self, audio: np.ndarray) -> str:
        return next((text for ref, text in self.known if ref.shape == audio.shape and np.allclose(ref, audio)), "")


def test_code_sources_resynthesise_the_true_codes_only_as_the_original(turns):
    gen = random_generator(0)
    pairs = same_voice_pairs(turns)
    result = code_source_wer(gen, pairs, _Oracle(gen, pairs))
    assert result["pairs"] == 2
    assert result["wer"]["original"] == 0.0  # the true codes, decoded as they are
    # the random model's codes differ from the true ones, so nothing else is heard
    assert all(result["wer"][s] == 1.0 for s in ("c0_true+depth", "c0_model+acoustic_true", "c0_model+depth"))
