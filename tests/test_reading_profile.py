"""The reading diagnostic (csm_jax.evaluation.reading): same-voice pairs from a manifest's turns, and the
teacher-forced per-part losses with the own and another text, checked against the trainer's loss on the same rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from csm_jax.audio import load_audio
from csm_jax.csm.model import Csm
from csm_jax.csm.prompt import concat
from csm_jax.data.grammar import heldout
from csm_jax.data.manifest import Utterance
from csm_jax.data.synth import Voice, synthesise
from csm_jax.default_model import random_generator
from csm_jax.evaluation.reading import code_source_wer, input_reliance, reading_profile, same_voice_pairs
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


def _reference_scores(gen, pairs, edit) -> tuple[float, float]:
    """c0 accuracy and NLL of each pair's target frames on rows built here, `edit(tokens, mask, rows, hidden)`
    applied to the target's audio rows first (hidden: the backbone's states before each frame on the true rows)."""
    fmt, model, k = gen.prompt_format(), Csm(gen.cfg), gen.cfg.num_codebooks
    forward = jax.jit(lambda t, m: model.apply({"params": gen.params}, t, m, method=Csm.backbone_forward))
    acc, nll = [], []
    for prompt, target in pairs:
        audio = gen.audio_rows(load_audio(target.audio))
        frames = len(audio[0]) - 1
        tokens, mask = concat([fmt.text_rows(prompt.text, 0), gen.audio_rows(load_audio(prompt.audio)),
                               fmt.text_rows(target.text, 0), audio])
        s = len(tokens) - frames - 1
        hidden = np.asarray(forward(tokens[None], mask[None])[1])[0, s - 1: s - 1 + frames]
        tokens, mask = edit(tokens.copy(), mask.copy(), slice(s, s + frames), hidden, k)
        logits = np.asarray(forward(tokens[None], mask[None])[0], np.float64)[0, s - 1: s - 1 + frames]
        true = tokens[s: s + frames, 0]
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        acc.append(np.mean(logits[:, : gen.codec.config.codebook_size].argmax(-1) == true))
        nll.append(-np.mean(lp[np.arange(frames), true]))
    return float(np.mean(acc)), float(np.mean(nll))


def test_input_reliance_scores_true_masked_and_fed_back_fine_codes(turns):
    gen = random_generator(0)
    pairs = same_voice_pairs(turns)[:1]  # one pair: each target length compiles its own programs
    result = input_reliance(gen, pairs, levels=(1, 3))
    assert result["pairs"] == 1
    assert set(result["accuracy"]["depth"]) == set(result["nll"]["masked"]) == {1, 3}

    def keep(tokens, mask, rows, hidden, k):
        return tokens, mask

    def mask_from(m):
        def edit(tokens, mask, rows, hidden, k):
            mask[rows, m:k] = False
            return tokens, mask
        return edit

    model = Csm(gen.cfg)
    depth = jax.jit(lambda h, c: model.apply({"params": gen.params}, h, c, method=Csm.depth_forward))

    def depth_from(m):  # the depth decoder's greedy codebooks m..K-1, one at a time, each given those before it
        def edit(tokens, mask, rows, hidden, k):
            codes = tokens[rows, :k].copy()
            for i in range(m, k):
                logits = depth(hidden, codes)
                codes[:, i] = np.asarray(logits)[:, i - 1, : gen.codec.config.codebook_size].argmax(-1)
            tokens[rows, :k] = codes
            return tokens, mask
        return edit

    for key, edit in [(("true",), keep), (("masked", 1), mask_from(1)), (("masked", 3), mask_from(3)),
                      (("depth", 1), depth_from(1)), (("depth", 3), depth_from(3))]:
        acc, nll = _reference_scores(gen, pairs, edit)
        got_acc, got_nll = (result[name][key[0]] if len(key) == 1 else result[name][key[0]][key[1]]
                            for name in ("accuracy", "nll"))
        assert got_acc == pytest.approx(acc, abs=1e-6) and got_nll == pytest.approx(nll, rel=1e-4), key
    # what the backbone sees matters: masking the fine codebooks moves its loss
    assert result["nll"]["masked"][1] != pytest.approx(result["nll"]["true"], rel=1e-3)
    with pytest.raises(ValueError, match="levels must be codebook counts"):
        input_reliance(gen, pairs, levels=(gen.cfg.num_codebooks,))
