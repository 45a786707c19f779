"""The multi-speaker speech corpus: synthesiser backends (real espeak-ng, flite and festival), the sentence grammar,
and the deterministic, resumable recipe (a handful of real utterances; structure at scale with a stub synthesiser).
"""

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pocketsphinx import get_model_path

from csm_jax.data import read_manifest, speech_corpus
from csm_jax.data.grammar import dialogue, heldout, vocabulary
from csm_jax.data.speech_corpus import make_speech_corpus
from csm_jax.data.synth import ENGINES, CorpusError, Voice, default_voices, synthesise
from csm_jax.evaluation.intelligibility import Intelligibility, normalize

SMALL = (Voice("espeak-ng", "en-us+m1", 40, 165), Voice("espeak-ng", "en-gb+f2", 75, 170), Voice("flite", "slt"),
         Voice("festival", "voice_kal_diphone"))
TEXT = "Could you book a room in Lisbon for three nights?"


def small_corpus(out: Path, **kwargs) -> Path:
    args = {"num_conversations": 3, "seed": 1, "voices": SMALL, "heldout_sentences": 20, "workers": 2,
            "progress": False} | kwargs
    return make_speech_corpus(out, **args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("speech") / "corpus")


def stub_synthesise(voice: Voice, text: str, path: Path) -> Path:
    """A silent WAV, for the structure of large corpora without the synthesis."""
    sf.write(path, np.zeros(160, np.int16), 16_000, subtype="PCM_16")
    return path


def features(path: Path) -> np.ndarray:
    """[3] float64: median F0 (Hz), median spectral centroid below 4 kHz (Hz) and duration (s) of a speech WAV."""
    x, sr = sf.read(path, dtype="float32")
    n = int(0.04 * sr)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    low = freqs < 4000
    f0, centroid = [], []
    for start in range(0, len(x) - n, n // 2):
        frame = x[start:start + n] - x[start:start + n].mean()
        if np.sqrt(np.mean(frame ** 2)) < 0.02:
            continue
        spec = np.abs(np.fft.rfft(frame * np.hanning(n)))[low]
        centroid.append((spec * freqs[low]).sum() / spec.sum())
        ac = np.correlate(frame, frame, "full")[n - 1:]
        lag = sr // 400 + np.argmax(ac[sr // 400:sr // 60])
        if ac[lag] > 0.3 * ac[0]:
            f0.append(sr / lag)
    return np.array([np.median(f0), np.median(centroid), len(x) / sr])


def test_grammar_sentences_distinct_heldout_and_in_the_asr_dictionary():
    def conversations(seed: int, held: list[str]) -> list[str]:  # like the recipe's default 1000 conversations
        rng, used = random.Random(seed), set(held)
        return [t for _ in range(1000) for t in dialogue(rng, rng.randint(2, 8), used)]

    held = heldout(200, seed=0)
    assert len(set(held)) == 200 and held == heldout(200, seed=0) and held != heldout(200, seed=1)
    texts = conversations(0, held)
    assert len(texts) == len(set(texts)) > 4500 and not set(texts) & set(held)
    assert texts == conversations(0, held) and texts[:20] != conversations(1, held)[:20]
    for t in texts + held:
        assert 3 <= len(t.split()) <= 16 and t[0].isupper() and t[-1] in ".?!" and not re.search(r"\d", t), t
    cmudict = Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"
    known = {line.split(" ", 1)[0].split("(")[0] for line in cmudict.read_text().splitlines()}
    assert vocabulary() <= known, sorted(vocabulary() - known)
    assert {w for t in texts + held for w in normalize(t).split()} <= vocabulary()
    assert Intelligibility(texts + held).unknown_words == []  # the ASR scorer knows every word


@pytest.mark.parametrize("voice", SMALL, ids=lambda v: v.label())
def test_each_engine_writes_real_speech(voice, tmp_path):
    assert {v.engine for v in SMALL} == set(ENGINES)
    path = synthesise(voice, TEXT, tmp_path / "x.wav")
    info = sf.info(path)
    assert info.channels == 1 and info.subtype == "PCM_16" and 8000 <= info.samplerate <= 48_000
    assert 1.5 < info.duration < 6.0, info.duration  # ten words
    audio, _ = sf.read(path, dtype="float32")
    assert np.abs(audio).max() > 0.1 and np.sqrt(np.mean(audio ** 2)) > 0.01  # speech, not silence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]  # no temporary file left


def test_default_voices_are_all_different(tmp_path):
    voices = default_voices()
    assert len(voices) == 24 and len({v.label() for v in voices}) == 24
    assert [sum(v.engine == e for v in voices) for e in ("espeak-ng", "flite", "festival")] == [16, 5, 3]
    feats = np.log([features(synthesise(v, TEXT, tmp_path / f"{i}.wav")) for i, v in enumerate(voices)])
    apart = np.abs(feats[:, None] - feats[None]).max(-1) + np.eye(len(voices))  # largest relative difference
    i, j = np.unravel_index(apart.argmin(), apart.shape)
    assert apart.min() > 0.05, (voices[i].label(), voices[j].label())  # F0, brightness or rate differ by 5%+
    f0 = np.exp(feats[:, 0])
    assert f0.min() < 90 and f0.max() > 250  # low male to high female


def test_corpus_layout_and_determinism(corpus, tmp_path):
    out = corpus.parent
    utts = read_manifest(corpus)  # validates, every wav exists
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    voices = json.loads((out / "voices.json").read_text())
    assert [voices[str(i)]["label"] for i in range(len(SMALL))] == [v.label() for v in SMALL]
    assert (out / "corpus.txt").read_text().splitlines() == [u.text for u in utts]
    held = (out / "heldout.txt").read_text().splitlines()
    assert held == heldout(20, seed=1) and not set(held) & {u.text for u in utts}
    assert len({u.text for u in utts}) == len(utts)
    for r, u in zip(records, utts):
        assert r["voice"] == voices[str(u.speaker)]["label"] and r["engine"] == SMALL[u.speaker].engine
        assert u.audio.name == f"{u.conversation}_{u.turn:02d}.wav" and 0.5 < sf.info(u.audio).duration < 8
    for conv in sorted({u.conversation for u in utts}):
        turns = [u for u in utts if u.conversation == conv]
        assert [u.turn for u in turns] == list(range(len(turns))) and 2 <= len(turns) <= 8
        assert all(a.speaker != b.speaker for a, b in itertools.pairwise(turns))
    again = small_corpus(tmp_path / "again")
    assert again.read_bytes() == corpus.read_bytes()
    for name in ("corpus.txt", "heldout.txt", "voices.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    for u in utts:  # same synthesiser versions: same audio
        assert (tmp_path / "again" / "wavs" / u.audio.name).read_bytes() == u.audio.read_bytes()
    other = small_corpus(tmp_path / "other", seed=2, num_conversations=1)
    assert [u.text for u in read_manifest(other)] != [u.text for u in utts[:len(read_manifest(other))]]


def test_structure_at_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(speech_corpus, "synthesise", stub_synthesise)
    voices = default_voices()
    utts = read_manifest(make_speech_corpus(tmp_path, num_conversations=300, progress=False, workers=2))
    convs: dict[str, list] = {}
    for u in utts:
        convs.setdefault(u.conversation, []).append(u)
    assert sorted(convs) == [f"c{i:05d}" for i in range(300)]
    assert {len(t) for t in convs.values()} == set(range(2, 9))
    casts = [{u.speaker for u in t} for t in convs.values()]
    assert {len(c) for c in casts} == {2, 3} and sum(len(c) == 3 for c in casts) < 100
    assert len({s for c in casts for s in c}) == len(voices)  # every voice speaks
    assert all(a.speaker != b.speaker for t in convs.values() for a, b in itertools.pairwise(t))
    assert len({u.text for u in utts}) == len(utts)
    first = read_manifest(make_speech_corpus(tmp_path / "fewer", num_conversations=10, progress=False))
    assert [(u.text, u.speaker) for u in first] == [(u.text, u.speaker) for u in utts[:len(first)]]


def test_resume_after_a_crash_keeps_finished_wavs(corpus, tmp_path, monkeypatch):
    total = len(read_manifest(corpus))
    calls: list[str] = []

    def crashing(voice, text, path):
        if len(calls) == 5:
            raise RuntimeError("killed")  # half way
        return counting(voice, text, path)

    def counting(voice, text, path):
        calls.append(path.name)
        return synthesise(voice, text, path)

    monkeypatch.setattr(speech_corpus, "synthesise", crashing)
    out = tmp_path / "corpus"
    with pytest.raises(RuntimeError, match="killed"):
        small_corpus(out, workers=1)
    assert not (out / "manifest.jsonl").exists()  # written last
    done = sorted((out / "wavs").glob("*.wav"))
    assert sorted(p.name for p in done) == sorted(calls) and len(done) == 5
    mtimes = {p: p.stat().st_mtime_ns for p in done}

    calls.clear()
    monkeypatch.setattr(speech_corpus, "synthesise", counting)
    assert small_corpus(out).read_bytes() == corpus.read_bytes()
    assert len(calls) == total - 5 and not set(calls) & {p.name for p in done}
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes

    lost = done[2]
    lost.unlink()
    lost.with_name(lost.stem + ".tmp.wav").write_bytes(b"half a file")  # killed mid-write
    calls.clear()
    small_corpus(out)
    assert calls == [lost.name] and sf.info(lost).duration > 0.5
    assert sorted((out / "wavs").glob("*.tmp.wav")) == []
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != lost)

    with pytest.raises(CorpusError, match="other seed; use a new directory"):
        small_corpus(out, seed=7)


def test_missing_programs_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(CorpusError, match=r"espeak-ng is not installed .*apt-get install espeak-ng"):
        default_voices()
    with pytest.raises(CorpusError, match=r"flite is not installed .*apt-get install flite"):
        small_corpus(tmp_path, voices=SMALL[2:3] + (Voice("flite", "awb"),))
    with pytest.raises(CorpusError, match=r"text2wave is not installed \(the festival synthesiser; .*apt-get "
                                          r"install festival\)"):
        synthesise(SMALL[3], TEXT, tmp_path / "x.wav")
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.parametrize("voice, message", [
    (Voice("espeak-ng", "nonexistent"), "espeak-ng failed for voice 'nonexistent'"),
    (Voice("flite", "nonexistent"), "flite has no voice 'nonexistent'"),
    (Voice("festival", "voice_nonexistent"), "festival failed for voice 'voice_nonexistent'.*unbound variable"),
])
def test_unknown_voices_fail(voice, message, tmp_path):
    with pytest.raises(CorpusError, match=message):
        synthesise(voice, TEXT, tmp_path / "x.wav")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, message", [
    (lambda out: Voice("mbrola", "us1"), "unknown engine 'mbrola'"),
    (lambda out: Voice("espeak-ng", "en-us", pitch=120), r"pitch must be in \[0, 99\]"),
    (lambda out: Voice("flite", "slt", speed=10), r"speed must be in \[25, 400\]"),
    (lambda out: Voice("festival", "voice_kal_diphone", pitch=100), "pitch and speed are not supported"),
    (lambda out: Voice("festival", '(system "ls")'), "must look like voice_<name>"),
    (lambda out: synthesise(SMALL[0], "  ", out), "empty text"),
    (lambda out: small_corpus(out, num_conversations=0), "num_conversations must be >= 1"),
    (lambda out: small_corpus(out, heldout_sentences=-1), "heldout_sentences must be >= 0"),
    (lambda out: small_corpus(out, workers=0), "workers must be >= 1"),
    (lambda out: small_corpus(out, voices=SMALL[:1]), "at least two distinct voices"),
    (lambda out: small_corpus(out, voices=SMALL[:1] * 2), "at least two distinct voices"),
    (lambda out: dialogue(random.Random(0), 0, set()), "turns must be >= 1"),
    (lambda out: heldout(-1), "count must be >= 0"),
])
def test_bad_arguments(make, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_hydra_config_makes_the_speech_corpus(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from csm_jax.experiment import make_corpus

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=speech", f"paths.data={tmp_path}", "data.corpus.num_conversations=2",
                                          "data.corpus.heldout_sentences=5"])
    data = OmegaConf.to_container(cfg.data, resolve=True)  # the rest needs Hydra's runtime
    assert data["corpus"]["recipe"] == "speech" and data["loader"]["context_turns"] == 2
    manifest = make_corpus({"data": data})
    assert manifest == tmp_path / "speech" / "corpus" / "manifest.jsonl"
    assert {u.conversation for u in read_manifest(manifest)} == {"c00000", "c00001"}
    assert len((manifest.parent / "heldout.txt").read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="unknown data.corpus.recipe 'nope'"):
        make_corpus({"data": {**data, "corpus": {"recipe": "nope"}}})
