"""PromptFormat: text ids through the text front end, turn rows, the context rule, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from csm_jax.csm.frontend import make_frontend
from csm_jax.csm.prompt import PromptFormat
from csm_jax.default_model import byte_tokenizer

K, VOCAB = 4, 2051


def test_espeak_front_end_gives_phonemes_and_keeps_the_speaker_tag() -> None:
    phonemes = make_frontend("espeak:en-us")
    assert phonemes.name == "espeak:en-us" and make_frontend("espeak:en-us") is phonemes
    said = phonemes("Hello there.")
    assert said == phonemes("Hello there.") and "ð" in said and said.endswith(".")
    assert phonemes("I read a book.") != phonemes("I read a boot.")
    fmt = PromptFormat(byte_tokenizer(), K, VOCAB, "espeak:en-us")
    ids = fmt.text_ids("Hello there.", 3)
    assert byte_tokenizer().decode(ids.tolist()[1:-1]) == f"[3]{said}"
    assert fmt.fingerprint() != PromptFormat(byte_tokenizer(), K, VOCAB).fingerprint()
    with pytest.raises(ValueError, match="unknown text front end"):
        make_frontend("festival")


def test_rows_and_context_rule() -> None:
    fmt = PromptFormat(byte_tokenizer(), K, VOCAB, max_context_turns=2)
    ids = fmt.text_ids("hi", 0)
    codes = np.arange(3 * 2).reshape(3, 2)
    tokens, mask = fmt.turn_rows(ids, codes)
    assert tokens.shape == (len(ids) + 4, K + 1) and fmt.turn_length(len(ids), 3) == len(tokens)
    np.testing.assert_array_equal(tokens[: len(ids), K], ids)
    np.testing.assert_array_equal(tokens[len(ids) : len(ids) + 3, :2], codes)
    assert mask[len(ids):, :2].all() and not mask[len(ids):, 2:].any()  # missing codebooks masked, end frame zero
    assert not tokens[-1].any()
    # Most recent whole turns that fit, at most max_context_turns, stopping at the first that does not fit.
    assert fmt.select_context([5, 5, 5], budget=100) == 2
    assert fmt.select_context([5, 50, 5], budget=20) == 1
    assert fmt.select_context([5, 5], budget=4) == 0
    assert fmt.with_context(0).select_context([1], budget=100) == 0
    (rows, _), kept, _ = fmt.conversation_rows([(ids, None), (None, codes), (ids, codes)], ids, budget=100)
    assert kept == 2 and len(rows) == 4 + len(ids) + 4 + len(ids)
    with pytest.raises(ValueError, match="text or audio"):
        fmt.turn_rows(None, None)
    with pytest.raises(ValueError, match="max_context_turns"):
        PromptFormat(byte_tokenizer(), K, VOCAB, max_context_turns=-1)
