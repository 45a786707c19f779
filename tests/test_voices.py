"""Voice presets: the `voices.json` format (round trip and bad files), the conversation format's rule for when a
preset prompts a turn, and the conversation manager building those prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_jax.conversation import ConversationManager, SQLiteStore
from csm_jax.csm.prompt import PromptFormat, concat, voice_applies
from csm_jax.csm.voices import VOICES_FILE, read_voices, resolve, save_voice
from csm_jax.default_model import byte_tokenizer

K, VOCAB = 4, 2051


def tone(seconds: float, rate: int = 24_000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_presets_round_trip_and_resolve(tmp_path: Path) -> None:
    assert read_voices(tmp_path) == {} and resolve({}, "default") is None and resolve({}, None) is None
    save_voice(tmp_path, "calm", [("  It was great.  ", tone(1.0)), ("See you.", tone(0.5, freq=330.0))])
    save_voice(tmp_path, "default", [("Hello there.", tone(0.5, rate=16_000))], sample_rate=16_000)  # resampled
    voices = read_voices(tmp_path)
    assert sorted(voices) == ["calm", "default"]
    assert [text for text, _ in voices["calm"].turns] == ["It was great.", "See you."]
    assert voices["default"].turns[0][1].shape == (12_000,)
    np.testing.assert_allclose(voices["calm"].turns[1][1], tone(0.5, freq=330.0), atol=1e-4)  # PCM16 on disk
    assert json.loads((tmp_path / VOICES_FILE).read_text())["calm"] == {"turns": [
        {"text": "It was great.", "audio": "voices/calm_0.wav"}, {"text": "See you.", "audio": "voices/calm_1.wav"}]}
    save_voice(tmp_path, "calm", [("Replaced.", tone(0.2))])  # replacing keeps the others, drops its old turns
    assert [t for t, _ in read_voices(tmp_path)["calm"].turns] == ["Replaced."] and "default" in read_voices(tmp_path)
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == ["calm_0.wav", "default_0.wav"]
    # the one-turn shorthand of a hand-written file
    (tmp_path / VOICES_FILE).write_text('{"short": {"text": "Hi.", "audio": "voices/calm_0.wav"}}')
    assert [t for t, _ in read_voices(tmp_path)["short"].turns] == ["Hi."]
    assert resolve(voices, "default") is voices["default"] and resolve(voices, None) is None
    with pytest.raises(ValueError, match=r"unknown voice 'loud'.*\['calm', 'default'\]"):
        resolve(voices, "loud")
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(ValueError, match="voice name"):
            save_voice(tmp_path, bad, [("Hi.", tone(0.2))])
    with pytest.raises(ValueError, match="at most 30 s"):
        save_voice(tmp_path, "long", [("Hi.", tone(16.0, rate=8_000))] * 2, sample_rate=8_000)
    with pytest.raises(ValueError, match="non-empty"):
        save_voice(tmp_path, "quiet", [(" ", tone(0.2))])
    with pytest.raises(ValueError, match="at least one turn"):
        save_voice(tmp_path, "none", [])


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    ("[1, 2]", "expected an object"),
    ('{"bad name": {"text": "Hi.", "audio": "a.wav"}}', "voice name"),
    ('{"a": {"text": "Hi.", "audio": "a.wav", "pitch": 3}}', "expected"),
    ('{"a": {"turns": []}}', "at least one turn"),
    ('{"a": {"turns": [{"text": "Hi."}]}}', "exactly the keys"),
    ('{"a": {"text": "", "audio": "a.wav"}}', "'text' must be"),
    ('{"a": {"text": "Hi.", "audio": "../a.wav"}}', "'audio' must be a path inside"),
    ('{"a": {"text": "Hi.", "audio": "/etc/passwd"}}', "'audio' must be a path inside"),
    ('{"a": {"text": "Hi.", "audio": "missing.wav"}}', "missing.wav"),
    ('{"a": {"text": "Hi.", "audio": "empty.wav"}}', "empty"),
    ('{"a": {"text": "Hi.", "audio": "noise.wav"}}', "noise.wav"),
])
def test_bad_voice_files_are_clear_errors(tmp_path: Path, content: str, match: str) -> None:
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 24_000)
    (tmp_path / "noise.wav").write_bytes(b"RIFF but not really a wav file")
    (tmp_path / VOICES_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read_voices(tmp_path)
    assert VOICES_FILE in str(e.value)


def test_the_voice_rule_and_its_rows() -> None:
    fmt = PromptFormat(byte_tokenizer(), K, VOCAB, max_context_turns=2)
    # a preset prompts a turn only when no context turn is audio of its speaker
    assert voice_applies([], 0) and voice_applies([(1, True), (0, False)], 0)
    assert not voice_applies([(1, True), (0, True)], 0)
    ids, target = fmt.text_ids("hi", 1), fmt.text_ids("next", 0)
    old, new = (fmt.text_ids("It was great.", 0), np.ones((3, K), np.int32)), (fmt.text_ids("Bye.", 0),
                                                                               np.ones((2, K), np.int32))
    voice = [old, new]
    history = [(ids, None), (ids, np.zeros((2, K), np.int32)), (ids, None)]

    def check(got, *turns):
        want = concat([*(fmt.turn_rows(*t) for t in turns), fmt.id_rows(target)])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])

    # the preset's newest turn takes one of the two context turns: only the newest history turn stays
    rows, kept, voiced = fmt.conversation_rows(history, target, 1000, voice)
    assert (kept, voiced) == (1, 1)
    check(rows, new, history[-1])
    # with no history, the preset's older turns fill the turns left
    rows, kept, voiced = fmt.conversation_rows([], target, 1000, voice)
    assert (kept, voiced) == (0, 2)
    check(rows, old, new)
    # ... and the rows left: the older turn is left out when it does not fit
    rows, kept, voiced = fmt.conversation_rows([], target, fmt.turn_length(len(new[0]), 2), voice)
    assert (kept, voiced) == (0, 1)
    check(rows, new)
    # a preset whose newest turn does not fit the budget is left out: the context is what it is without one
    small = fmt.turn_length(len(new[0]), 2) - 1
    rows, kept, voiced = fmt.conversation_rows(history, target, small, voice)
    plain, plain_kept, _ = fmt.conversation_rows(history, target, small)
    assert voiced == 0 and kept == plain_kept >= 1
    np.testing.assert_array_equal(rows[0], plain[0])
    # no context turns at all: no preset either
    (rows, _), kept, voiced = fmt.with_context(0).conversation_rows(history, target, 1000, voice)
    assert voiced == kept == 0 and len(rows) == len(target)


def test_the_manager_prompts_with_a_preset_until_the_speaker_has_spoken() -> None:
    fmt = PromptFormat(byte_tokenizer(), K, VOCAB, max_context_turns=4)
    store = SQLiteStore(":memory:")
    m = ConversationManager(store, fmt, max_seq_len=512)
    preset = [("It was great.", np.full((5, K), 7, np.int32))]
    cid, _ = m.start()

    def expect(*parts):
        return concat([*parts, fmt.text_rows("Next one.", 0)])[0]

    voice_rows = fmt.turn_rows(fmt.text_ids(preset[0][0], 0), preset[0][1])
    p = m.build_prompt(cid, "Next one.", 0, max_frames=20, voice=preset)
    assert p.voice_turns == 1 and p.context_turns == 0
    np.testing.assert_array_equal(p.tokens, expect(voice_rows))
    user = np.full((4, K), 3, np.int32)
    m.add_turn(cid, 1, "Hello.", user, "user")  # the other speaker's audio: the preset still speaks for speaker 0
    p = m.build_prompt(cid, "Next one.", 0, max_frames=20, voice=preset)
    assert p.voice_turns == 1 and p.context_turns == 1
    np.testing.assert_array_equal(p.tokens, expect(voice_rows, fmt.turn_rows(fmt.text_ids("Hello.", 1), user)))
    m.add_turn(cid, 0, "Mine.", np.full((3, K), 5, np.int32), "generated")  # speaker 0's own audio takes over
    p = m.build_prompt(cid, "Next one.", 0, max_frames=20, voice=preset)
    assert p.voice_turns == 0 and p.context_turns == 2
    np.testing.assert_array_equal(p.tokens, m.build_prompt(cid, "Next one.", 0, max_frames=20).tokens)
    store.close()
