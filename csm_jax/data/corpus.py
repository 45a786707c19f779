"""A small real-speech corpus synthesised with espeak-ng, for the tiny training recipe and the tests.

    manifest = make_espeak_corpus("outputs/espeak", num_conversations=40, turns=4)

Each voice (an espeak-ng voice with its own pitch and speed) is a speaker; a conversation alternates between two
distinct voices and its turns are simple English sentences from a seeded generator. The output directory gets
`wavs/*.wav` (as espeak-ng writes them: mono 16-bit at 22050 Hz; `prepare` resamples), `manifest.jsonl` (see
`csm_jax.data.manifest`; extra key `voice`) and `corpus.txt` (every sentence, one a line, for a text model).
The same arguments give the same texts and speakers, and (with the same espeak-ng) the same audio. Synthesis is
`csm_jax.data.synth`'s; `csm_jax.data.speech_corpus` makes the larger corpus of every offline synthesiser.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from csm_jax.data import synth
from csm_jax.data.manifest import write_manifest
from csm_jax.data.synth import CorpusError

__all__ = ["VOICES", "CorpusError", "Voice", "make_espeak_corpus", "sentences"]


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice name (`espeak-ng --voices`), pitch 0..99 (`-p`) and speed in words per minute (`-s`)."""

    name: str
    pitch: int = 50
    speed: int = 160

    def label(self) -> str:
        return f"{self.name} p{self.pitch} s{self.speed}"

    def synth_voice(self) -> synth.Voice:
        """This voice for `csm_jax.data.synth.synthesise`."""
        return synth.Voice("espeak-ng", self.name, self.pitch, self.speed)


VOICES = (
    Voice("en-us", pitch=45, speed=165),
    Voice("en-gb", pitch=30, speed=150),
    Voice("en-gb-scotland", pitch=65, speed=180),
    Voice("en-us+f3", pitch=75, speed=160),
)

_SUBJECTS = ("the cat", "my brother", "a small dog", "the teacher", "our neighbour", "the old man", "my sister",
             "a young girl", "the farmer", "the doctor", "my friend", "the baker")
_VERBS = ("likes", "found", "painted", "carried", "wanted", "lost", "cleaned", "bought", "opened", "fixed")
_OBJECTS = ("a red apple", "the blue door", "an old map", "the green box", "a warm coat", "the big window",
            "a yellow kite", "the kitchen table", "a long letter", "the little boat")
_ENDINGS = ("", " today", " this morning", " at home", " last night", " in the garden", " after lunch")
_QUESTIONS = ("Where did you put {o}?", "Have you seen {o}?", "Who {v} {o}?", "Do you think {s} {v} {o}?",
              "Why is {o} here?")
_REPLIES = ("Yes, I think so.", "No, not yet.", "I am not sure.", "Maybe tomorrow.", "That sounds good to me.",
            "Let me check.", "I really do not know.", "Of course it is.")


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` distinct simple English sentences (statements, questions, short replies), deterministic in `seed`.

    There are about nine thousand possible sentences; asking for more than 5000 raises."""
    if count > 5000:
        raise ValueError("at most 5000 distinct sentences")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        kind = rng.random()
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        if kind < 0.6:
            text = f"{s} {v} {o}{rng.choice(_ENDINGS)}."
        elif kind < 0.9:
            text = rng.choice(_QUESTIONS).format(s=s, v=v, o=o)
        else:
            text = rng.choice(_REPLIES)
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def make_espeak_corpus(out_dir: str | os.PathLike[str], num_conversations: int = 40, turns: int = 4,
                       voices: tuple[Voice | str, ...] = VOICES, seed: int = 0, workers: int | None = None) -> Path:
    """Synthesise the corpus into `out_dir` -> the path of its `manifest.jsonl` (see the module docstring).

    Speaker ids are indices into `voices` (at least two; a plain string is a voice at default pitch and speed).
    Conversation `c{i:04d}` has `turns` turns alternating between two voices picked by the seeded generator."""
    if num_conversations < 1 or turns < 1:
        raise ValueError("num_conversations and turns must be >= 1")
    voices = tuple(Voice(v) if isinstance(v, str) else v for v in voices)
    if len(voices) < 2:
        raise ValueError("need at least two voices")
    synth.program("espeak-ng")
    out = Path(out_dir)
    wavs = out / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = sentences(num_conversations * turns, seed)
    records, jobs = [], []
    for c in range(num_conversations):
        pair = rng.sample(range(len(voices)), 2)
        for t in range(turns):
            speaker = pair[t % 2]
            conv, text = f"c{c:04d}", texts[c * turns + t]
            name = f"{conv}_{t:02d}.wav"
            records.append({"audio": f"wavs/{name}", "text": text, "speaker": speaker, "conversation": conv,
                            "turn": t, "voice": voices[speaker].label()})
            jobs.append((voices[speaker].synth_voice(), text, wavs / name))
    with ThreadPoolExecutor(max_workers=workers or min(8, 2 * (os.cpu_count() or 1))) as pool:
        for future in [pool.submit(synth.synthesise, *job) for job in jobs]:
            future.result()
    (out / "corpus.txt").write_text("".join(r["text"] + "\n" for r in records), encoding="utf-8")
    return write_manifest(out / "manifest.jsonl", records)
