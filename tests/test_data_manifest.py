"""Training-data manifests (every error case) and the espeak-ng corpus generator (real synthesis)."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from csm_jax.data.corpus import VOICES, CorpusError, make_espeak_corpus, sentences
from csm_jax.data.manifest import ManifestError, read_manifest

GOOD = {"audio": "a.wav", "text": "Hello there.", "speaker": 0, "conversation": "c1", "turn": 0}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def wav_dir(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(2400, np.float32), 24000)
    sf.write(tmp_path / "b.wav", np.zeros(2400, np.float32), 24000)
    return tmp_path


def test_read_manifest_fields_paths_and_extra_keys(wav_dir):
    absolute = str(wav_dir / "b.wav")
    path = _write(wav_dir / "m.jsonl", [GOOD, "", {**GOOD, "audio": absolute, "turn": 1, "speaker": 3, "mood": "calm"}])
    first, second = read_manifest(path)
    assert first.audio == wav_dir / "a.wav" and first.audio.is_absolute()
    assert (first.text, first.speaker, first.conversation, first.turn) == ("Hello there.", 0, "c1", 0)
    assert str(second.audio) == absolute and second.speaker == 3 and second.turn == 1
    assert dict(second.extra) == {"mood": "calm"} and dict(first.extra) == {}
    assert first.source == f"{path}:1" and second.source == f"{path}:3"
    assert second.key == ("c1", 1)


def test_manifest_not_found(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_invalid_json_names_line(wav_dir):
    path = _write(wav_dir / "m.jsonl", [GOOD, '{"audio": "a.wav", "text": '])
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: invalid JSON"):
        read_manifest(path)


def test_not_an_object(wav_dir):
    path = _write(wav_dir / "m.jsonl", ["[1, 2]"])
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: expected a JSON object, got list"):
        read_manifest(path)


def test_missing_fields_named(wav_dir):
    record = {k: v for k, v in GOOD.items() if k not in ("speaker", "turn")}
    path = _write(wav_dir / "m.jsonl", [GOOD, record])
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: missing field\(s\) 'speaker', 'turn'"):
        read_manifest(path)


@pytest.mark.parametrize("field, value", [
    ("speaker", "1"), ("speaker", -1), ("speaker", True), ("turn", 1.0), ("turn", None), ("text", ""),
    ("text", "   "), ("text", 5), ("conversation", 7), ("conversation", ""), ("audio", ""), ("audio", ["a.wav"]),
])
def test_wrong_typed_fields(wav_dir, field, value):
    path = _write(wav_dir / "m.jsonl", [{**GOOD, field: value}])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:1: field '{field}' must be"):
        read_manifest(path)


def test_duplicate_conversation_turn(wav_dir):
    path = _write(wav_dir / "m.jsonl", [GOOD, {**GOOD, "turn": 1}, {**GOOD, "audio": "b.wav"}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: duplicate \(conversation 'c1', turn 0\); first at line 1"):
        read_manifest(path)


def test_empty_corpus(wav_dir):
    for lines in ([], ["", "  "]):
        path = _write(wav_dir / "m.jsonl", lines)
        with pytest.raises(ManifestError, match="empty corpus"):
            read_manifest(path)


def test_missing_audio_files_listed(wav_dir):
    records = [GOOD] + [{**GOOD, "audio": f"gone{i}.wav", "turn": i + 1} for i in range(12)]
    path = _write(wav_dir / "m.jsonl", records)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    msg = str(info.value)
    assert "12 audio file(s) not found" in msg and "(and 2 more)" in msg
    assert "line 2: " in msg and str(wav_dir / "gone0.wav") in msg and "gone9.wav" in msg
    assert "gone10.wav" not in msg and "a.wav" not in msg
    assert len(read_manifest(path, check_audio=False)) == 13


def test_sentences_distinct_and_seeded():
    a = sentences(300, seed=0)
    assert len(set(a)) == 300 and a == sentences(300, seed=0) and a != sentences(300, seed=1)
    assert all(s[0].isupper() and s[-1] in ".?" for s in a)


def test_espeak_corpus(tmp_path):
    manifest = make_espeak_corpus(tmp_path / "corpus", num_conversations=5, turns=3, seed=3)
    utts = read_manifest(manifest)  # validates everything, including that every wav exists
    assert len(utts) == 15 and len({u.conversation for u in utts}) == 5
    assert (tmp_path / "corpus" / "corpus.txt").read_text().splitlines() == [u.text for u in utts]
    assert len({u.text for u in utts}) == 15
    voice_of = {}
    for u in utts:
        info = sf.info(u.audio)
        assert info.samplerate == 22050 and info.channels == 1
        assert 0.5 < info.duration < 8.0, (u.audio, info.duration)
        audio, _ = sf.read(u.audio, dtype="float32")
        assert np.abs(audio).max() > 0.05  # speech, not silence
        assert voice_of.setdefault(u.speaker, u.extra["voice"]) == u.extra["voice"]
        assert u.extra["voice"] == VOICES[u.speaker].label()
    assert len(set(voice_of.values())) == len(voice_of) >= 2  # one voice per speaker, all distinct
    for conv in {u.conversation for u in utts}:
        turns = sorted((u for u in utts if u.conversation == conv), key=lambda u: u.turn)
        assert [u.turn for u in turns] == [0, 1, 2]
        speakers = [u.speaker for u in turns]
        assert speakers[0] == speakers[2] != speakers[1]  # two voices alternate
    again = make_espeak_corpus(tmp_path / "again", num_conversations=5, turns=3, seed=3)
    assert [(u.text, u.speaker) for u in read_manifest(again)] == [(u.text, u.speaker) for u in utts]


def test_espeak_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get install espeak-ng"):
        make_espeak_corpus(tmp_path, num_conversations=1, turns=1)


def test_espeak_bad_voice(tmp_path):
    with pytest.raises(CorpusError, match="nonexistent"):
        make_espeak_corpus(tmp_path, num_conversations=1, turns=2, voices=("en-us", "nonexistent"), seed=0)
