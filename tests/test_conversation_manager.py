"""ConversationManager with the real default Generator: prompts match Generator.prompt, context windowing."""

import dataclasses

import numpy as np
import pytest

import csm_jax
from csm_jax import Segment
from csm_jax.conversation import ContextFull, ConversationManager, Prompt, SQLiteStore, UnknownConversation
from csm_jax.default_model import byte_tokenizer, tiny_csm_config


@pytest.fixture(scope="module")
def gen():
    """The default model's Generator (its config and byte-level tokenizer) without its random weights and codec:
    the manager only uses text_rows / code_rows / cfg, and initialising the weights takes 15-50 s on CPU."""
    tokenizer = byte_tokenizer()
    return csm_jax.Generator(None, tiny_csm_config(tokenizer.get_vocab_size()), None, tokenizer)


@pytest.fixture
def store():
    s = SQLiteStore(":memory:")
    yield s
    s.close()


def manager(store, g, max_turns: int = 16, cache_size: int = 4096) -> ConversationManager:
    return ConversationManager(store, g.prompt_format().with_context(max_turns), g.cfg.backbone.max_seq_len,
                               cache_size=cache_size)


def small(gen, max_seq_len: int) -> csm_jax.Generator:
    """The same model with a shorter context (the manager only reads text_rows / code_rows / cfg)."""
    cfg = gen.cfg.replace(backbone=dataclasses.replace(gen.cfg.backbone, max_seq_len=max_seq_len))
    return csm_jax.Generator(gen.params, cfg, None, gen.tokenizer)


def codes(frames: int, books: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (frames, books)).astype(np.int32)


def cat(*parts):
    return np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts])


def test_text_context_matches_generator_prompt(gen, store):
    assert gen.cfg.backbone.max_seq_len == 2048 and gen.cfg.num_codebooks == 8
    m = manager(store, gen)
    cid, resumed = m.start()
    assert not resumed and store.has_conversation(cid)
    said = [(1, "Hi there!"), (0, "Hello, how are you?"), (1, "Fine, thanks.")]
    for speaker, text in said:
        m.add_turn(cid, speaker, text, None, "user")
    p = m.build_prompt(cid, "Glad to hear it.", 0, max_frames=50)
    tokens, mask = gen.prompt("Glad to hear it.", 0, [Segment(s, t) for s, t in said])
    assert isinstance(p, Prompt) and p.context_turns == 3 and p.rows == len(tokens)
    assert p.tokens.dtype == np.int32 and p.mask.dtype == np.bool_ and p.tokens.shape == (p.rows, 9)
    np.testing.assert_array_equal(p.tokens, tokens)
    np.testing.assert_array_equal(p.mask, mask)


def test_audio_context_rows(gen, store):
    m = manager(store, gen)
    cid, _ = m.start()
    c1, c2 = codes(7), codes(4, books=5, seed=1)
    t1 = m.add_turn(cid, 1, "Spoken.", c1, "user")
    t2 = m.add_turn(cid, 0, "", c2, "generated")  # audio without transcript: audio rows only
    expect1 = cat(gen.text_rows("Spoken.", 1), gen.code_rows(c1))
    for got, want in zip(m.turn_rows(t1), expect1):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(m.turn_rows(t2), gen.code_rows(c2)):
        np.testing.assert_array_equal(got, want)
    p = m.build_prompt(cid, "Next.", 1, max_frames=10)
    tokens, mask = cat(expect1, gen.code_rows(c2), gen.text_rows("Next.", 1))
    np.testing.assert_array_equal(p.tokens, tokens)
    np.testing.assert_array_equal(p.mask, mask)
    assert p.context_turns == 2 and p.rows == len(tokens) == len(expect1[0]) + 5 + len(gen.text_rows("Next.", 1)[0])
    # a stored turn (read back from the store) builds the same rows
    (back,) = m.history(cid, limit=1)
    for got, want in zip(m.turn_rows(back), gen.code_rows(c2)):
        np.testing.assert_array_equal(got, want)


def rows_of(gen, text, speaker, frames=None):
    return len(gen.text_rows(text, speaker)[0]) + (0 if frames is None else frames + 1)


def test_windowing_keeps_most_recent_whole_turns(gen, store):
    g = small(gen, 128)
    m = manager(store, g)
    cid, _ = m.start()
    # turn sizes in rows: "[0]a" -> 1 + 4 + 1 = 6 rows of text; with codes of T frames: + T + 1
    sizes = []
    for i, frames in enumerate([10, None, 30, None, 20]):
        text = f"turn {i}"
        m.add_turn(cid, i % 2, text, None if frames is None else codes(frames, seed=i), "user")
        sizes.append(rows_of(g, text, i % 2, frames))
    target = rows_of(g, "go", 0)
    budget = 128 - 40 - target
    p = m.build_prompt(cid, "go", 0, max_frames=40)
    # newest backwards until one does not fit
    n, used = 0, 0
    for s in reversed(sizes):
        if used + s > budget:
            break
        used, n = used + s, n + 1
    assert 0 < n < 5 and p.context_turns == n and p.rows == used + target
    turns = m.history(cid)[-n:]
    np.testing.assert_array_equal(p.tokens, cat(*[m.turn_rows(t) for t in turns], g.text_rows("go", 0))[0])
    # the window stopped at a turn that does not fit; an older, smaller one that would fit is not used
    assert sizes[-n - 1] > budget - used and min(sizes[: -n - 1]) <= budget - used


def test_window_never_skips_newer_turn_for_older(gen, store):
    g = small(gen, 100)
    m = manager(store, g)
    cid, _ = m.start()
    m.add_turn(cid, 0, "old", None, "user")          # small
    m.add_turn(cid, 1, "big", codes(60), "user")     # large
    m.add_turn(cid, 0, "new", None, "user")          # small
    p = m.build_prompt(cid, "x", 1, max_frames=20)
    # budget = 100 - 20 - 6 = 74: "new" (8 rows) fits, "big" (8 + 61) does not, so "old" is not reached
    assert p.context_turns == 1
    np.testing.assert_array_equal(p.tokens, cat(g.text_rows("new", 0), g.text_rows("x", 1))[0])


def test_max_turns(gen, store):
    for max_turns in (0, 2):
        m = manager(store, gen, max_turns=max_turns)
        cid, _ = m.start()
        for i in range(5):
            m.add_turn(cid, 0, f"t{i}", None, "user")
        p = m.build_prompt(cid, "x", 0, max_frames=10)
        assert p.context_turns == max_turns
        expect = gen.prompt("x", 0, [Segment(0, f"t{i}") for i in range(5 - max_turns, 5)])[0]
        np.testing.assert_array_equal(p.tokens, expect)


def test_newest_turn_too_big_drops_all_history(gen, store):
    g = small(gen, 64)
    m = manager(store, g)
    cid, _ = m.start()
    m.add_turn(cid, 0, "small", None, "user")
    m.add_turn(cid, 1, "huge", codes(50), "generated")
    p = m.build_prompt(cid, "hi", 0, max_frames=8)
    assert p.context_turns == 0
    np.testing.assert_array_equal(p.tokens, g.text_rows("hi", 0)[0])
    np.testing.assert_array_equal(p.mask, g.text_rows("hi", 0)[1])


def test_exact_fit_and_context_full(gen, store):
    g = small(gen, 64)
    m = manager(store, g)
    cid, _ = m.start()
    m.add_turn(cid, 0, "abc", None, "user")  # 1 + 6 + 1 = 8 rows
    target = rows_of(g, "hello", 1)          # 1 + 8 + 1 = 10 rows
    assert m.build_prompt(cid, "hello", 1, max_frames=64 - target - 8).context_turns == 1
    assert m.build_prompt(cid, "hello", 1, max_frames=64 - target - 7).context_turns == 0
    p = m.build_prompt(cid, "hello", 1, max_frames=64 - target)  # target alone fills the context exactly
    assert p.context_turns == 0 and p.rows == target
    with pytest.raises(ContextFull, match=r"target text \(10 rows\) \+ max_frames \(55\) exceed the 64-position"):
        m.build_prompt(cid, "hello", 1, max_frames=55)
    assert issubclass(ContextFull, ValueError)


def test_bad_arguments(gen, store):
    m = manager(store, gen)
    cid, _ = m.start()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_frames"):
            m.build_prompt(cid, "x", 0, max_frames=bad)
    with pytest.raises(ValueError, match="non-empty"):
        m.build_prompt(cid, " ", 0, max_frames=5)
    with pytest.raises(UnknownConversation):
        m.build_prompt("nope", "x", 0, max_frames=5)
    with pytest.raises(ValueError, match="max_context_turns"):
        manager(store, gen, max_turns=-1)
    with pytest.raises(ValueError, match="max_seq_len"):
        ConversationManager(store, gen.prompt_format(), 0)


def test_resume_existing_conversation(gen, tmp_path):
    path = tmp_path / "conv.db"
    s = SQLiteStore(path)
    m = manager(s, gen)
    cid, resumed = m.start()
    m.add_turn(cid, 0, "Before the restart.", codes(3), "generated")
    first = m.build_prompt(cid, "And after.", 1, max_frames=20)
    s.close()
    s = SQLiteStore(path)
    m = manager(s, gen)
    assert m.start(cid) == (cid, True)
    (t,) = m.history(cid)
    assert (t.index, t.text, t.frames, t.source) == (0, "Before the restart.", 3, "generated")
    again = m.build_prompt(cid, "And after.", 1, max_frames=20)
    assert again.context_turns == 1
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.mask, first.mask)
    with pytest.raises(UnknownConversation):
        m.start("0" * 32)
    s.close()


def test_row_cache_is_bounded_and_consistent(gen, store):
    m = manager(store, gen, cache_size=2)
    cid, _ = m.start()
    for i in range(4):
        m.add_turn(cid, 0, f"turn number {i}", None, "user")
    first = m.build_prompt(cid, "x", 0, max_frames=10)
    assert len(m._text_cache) == 2
    second = m.build_prompt(cid, "x", 0, max_frames=10)
    np.testing.assert_array_equal(first.tokens, second.tokens)
