"""Intelligibility scoring: pocketsphinx with a domain LM hears real (espeak-ng) speech and not noise."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import csm_jax
from csm_jax.evaluation import Intelligibility, normalize

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello there how are you today",
         "what a nice day it is", "please bring the green cup to the kitchen"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = tmp_path_factory.mktemp("espeak")
    clips = []
    for i, text in enumerate(TEXTS):
        path = root / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), text], check=True)
        clips.append(csm_jax.load_audio(path))
    return clips


def test_speech_scores_far_better_than_noise(speech: list[np.ndarray]) -> None:
    asr = Intelligibility(TEXTS + ["a day at the lake", "how nice of you"])
    wer_speech = asr.wer(speech, TEXTS)
    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 0.1, len(a)).astype(np.float32) for a in speech]
    wer_noise = asr.wer(noise, TEXTS)
    assert wer_speech < 0.6 and wer_noise >= 0.9, (wer_speech, wer_noise)
    assert asr.unknown_words == []


def test_normalize_and_bad_input(tmp_path: Path) -> None:
    assert normalize("Hello, World! It's 5 o'clock.") == "hello world it's o'clock"
    with pytest.raises(ValueError, match="non-empty corpus"):
        Intelligibility(["", "123 !"])
    asr = Intelligibility(TEXTS)
    with pytest.raises(ValueError, match="mono"):
        asr.transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="as many texts"):
        asr.wer([np.zeros(100, np.float32)], [])
