"""Rough intelligibility of generated speech: pocketsphinx recognition with a domain language model, scored as
word error rate (jiwer) against the intended text.

The language model is a trigram ARPA model built from the corpus text (pocketsphinx's `ArpaBoLM`), and the
pronunciation dictionary is the bundled CMU dictionary cut down to the corpus vocabulary, so the decoder starts in
milliseconds and only hears in-domain words. Absolute numbers are a coarse signal (pocketsphinx on synthetic
speech); compare models against each other and against the corpus audio itself.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import jiwer
import numpy as np
import soxr

from csm_jax.audio.processor import SAMPLE_RATE

ASR_RATE = 16_000
_WORD = re.compile(r"[a-z']+")


def normalize(text: str) -> str:
    """Lowercase words only (what the recogniser can output)."""
    return " ".join(_WORD.findall(text.lower()))


class Intelligibility:
    """`transcribe(audio float32 [N] at 24 kHz) -> str`; `wer(audios, texts) -> float` in [0, inf)."""

    def __init__(self, corpus_text: Iterable[str]):
        from pocketsphinx import Decoder, get_model_path, lm

        sentences = [s for s in (normalize(t) for t in corpus_text) if s]
        if not sentences:
            raise ValueError("intelligibility needs a non-empty corpus text for its language model")
        self._dir = tempfile.TemporaryDirectory(prefix="csm-jax-asr-")
        root = Path(self._dir.name)
        vocab = {w for s in sentences for w in s.split()}
        cmudict = Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"
        known = set()
        with cmudict.open() as src, (root / "domain.dict").open("w") as dst:
            for line in src:
                word = line.split(" ", 1)[0].split("(")[0]
                if word in vocab:
                    dst.write(line)
                    known.add(word)
        if not known:
            raise ValueError("no corpus word is in the pronunciation dictionary")
        self.unknown_words = sorted(vocab - known)
        model = lm.ArpaBoLM(text="\n".join(sentences) + "\n", add_start=True)
        model.compute()
        with (root / "domain.arpa").open("w") as f:
            model.write(f)
        self._decoder = Decoder(lm=str(root / "domain.arpa"), dict=str(root / "domain.dict"), samprate=ASR_RATE,
                                logfn="/dev/null")

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio must be non-empty mono float [N], got shape {list(audio.shape)}")
        x = soxr.resample(audio, sample_rate, ASR_RATE)
        peak = float(np.abs(x).max())
        pad = np.zeros(ASR_RATE // 2, np.float32)  # the recogniser's voice activity detection needs some lead-in
        x = np.concatenate([pad, x * (0.5 / peak) if peak > 0 else x, pad])
        self._decoder.start_utt()
        self._decoder.process_raw((x * 32767).astype("<i2").tobytes(), full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return "" if hyp is None else hyp.hypstr

    def wer(self, audios: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int = SAMPLE_RATE) -> float:
        """Corpus-level word error rate of the transcripts of `audios` against `texts`."""
        if len(audios) != len(texts) or not texts:
            raise ValueError(f"need as many texts as audios (>= 1), got {len(texts)} and {len(audios)}")
        return word_error_rate(texts, [self.transcribe(a, sample_rate) for a in audios])


def word_error_rate(texts: Sequence[str], transcripts: Sequence[str]) -> float:
    """Corpus-level word error rate of `transcripts` against the reference `texts` (both normalised)."""
    if len(texts) != len(transcripts) or not texts:
        raise ValueError(f"need as many transcripts as texts (>= 1), got {len(transcripts)} and {len(texts)}")
    return float(jiwer.wer([normalize(t) for t in texts], [normalize(h) for h in transcripts]))
