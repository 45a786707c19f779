"""A multi-speaker speech corpus from three offline synthesisers: espeak-ng, flite and festival (Debian packages).

    manifest = make_speech_corpus("data/speech/corpus")   # 1000 conversations, about 5000 utterances, 4 hours

Each voice of `csm_jax.data.synth.default_voices()` is a speaker. Conversation `c{i:05d}` has 2 to 8 turns said
alternately by two distinct speakers (sometimes three, in turn); its sentences come from `csm_jax.data.grammar`
(greetings, question/answer pairs, requests, statements), every one distinct, none of them held out. The directory
gets `wavs/<conversation>_<turn>.wav` (mono 16-bit at the engine's rate, 8 to 32 kHz; `prepare` resamples),
`manifest.jsonl` (see `csm_jax.data.manifest`; extra keys `voice` and `engine`), `corpus.txt` (the training
sentences in manifest order), `heldout.txt` (sentences no conversation says, for evaluation), `voices.json`
(speaker id -> voice) and `recipe.json` (the arguments that fix its content).

The same arguments give the same texts, speakers and manifest. Rerunning resumes: finished wavs (written
atomically) are kept and the manifest is written last. Conversation i does not depend on `num_conversations`, so a
rerun with more conversations extends the corpus; other changed arguments are refused.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csm_jax.data.grammar import dialogue, heldout
from csm_jax.data.manifest import write_manifest
from csm_jax.data.synth import CorpusError, Voice, default_voices, program, synthesise

MIN_TURNS, MAX_TURNS = 2, 8
THREE_SPEAKERS = 0.15  # chance that a conversation of three or more turns has a third speaker


def _plan(num_conversations: int, seed: int, voices: Sequence[Voice], held_out: set[str]) -> list[dict[str, Any]]:
    """The manifest records, in order: texts and speakers of every turn of every conversation."""
    rng, used, records = random.Random(seed), set(held_out), []
    for c in range(num_conversations):
        turns = rng.randint(MIN_TURNS, MAX_TURNS)
        three = len(voices) >= 3 and turns >= 3 and rng.random() < THREE_SPEAKERS
        cast = rng.sample(range(len(voices)), 3 if three else 2)
        for t, text in enumerate(dialogue(rng, turns, used)):
            speaker = cast[t % len(cast)]
            records.append({"audio": f"wavs/c{c:05d}_{t:02d}.wav", "text": text, "speaker": speaker,
                            "conversation": f"c{c:05d}", "turn": t, "voice": voices[speaker].label(),
                            "engine": voices[speaker].engine})
    return records


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """Refuse to resume a directory made with other arguments (its finished wavs would say other texts)."""
    path = out / "recipe.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != recipe:
            changed = sorted(k for k in recipe.keys() | before.keys() if before.get(k) != recipe.get(k))
            raise CorpusError(f"{out} holds a corpus made with other {', '.join(changed)}; use a new directory")
    else:
        _write_text(path, json.dumps(recipe, indent=2) + "\n")


def make_speech_corpus(out_dir: str | os.PathLike[str], num_conversations: int = 1000, seed: int = 0,
                       voices: Sequence[Voice] | None = None, heldout_sentences: int = 200,
                       workers: int | None = None, progress: bool = True) -> Path:
    """Synthesise (or finish) the corpus in `out_dir` -> the path of its `manifest.jsonl` (see the module docstring).

    voices: the speakers, speaker id = index (default `default_voices()`, at least two, distinct); workers:
    synthesis threads (default: the number of CPUs)."""
    if num_conversations < 1:
        raise ValueError(f"num_conversations must be >= 1, got {num_conversations}")
    if heldout_sentences < 0:
        raise ValueError(f"heldout_sentences must be >= 0, got {heldout_sentences}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    voices = default_voices() if voices is None else tuple(voices)
    if len(voices) < 2 or len({v.label() for v in voices}) != len(voices):
        raise ValueError(f"need at least two distinct voices, got {[v.label() for v in voices]}")
    for engine in sorted({v.engine for v in voices}):
        program(engine)  # a missing synthesiser fails now, not after hours
    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    _check_recipe(out, {"seed": seed, "heldout_sentences": heldout_sentences, "voices": [v.label() for v in voices]})

    held_out = heldout(heldout_sentences, seed)
    records = _plan(num_conversations, seed, voices, set(held_out))
    assert not set(held_out) & {r["text"] for r in records}, "held-out sentences leaked into training"
    _write_text(out / "heldout.txt", "".join(s + "\n" for s in held_out))
    _write_text(out / "corpus.txt", "".join(r["text"] + "\n" for r in records))
    _write_text(out / "voices.json", json.dumps(
        {str(i): {"label": v.label(), **asdict(v)} for i, v in enumerate(voices)}, indent=2) + "\n")

    todo = [r for r in records if not (out / r["audio"]).is_file()]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            tqdm(total=len(records), initial=len(records) - len(todo), desc="synthesise", unit="utt",
                 disable=not progress) as bar:
        futures = [pool.submit(synthesise, voices[r["speaker"]], r["text"], out / r["audio"]) for r in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return write_manifest(out / "manifest.jsonl", records)
