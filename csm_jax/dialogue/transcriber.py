"""Speech recognition for user audio turns, so the stored turn (and the next CSM prompt) holds its text as well as
its audio, as CSM was trained.

    transcriber = build_transcriber(TranscriberConfig())            # pocketsphinx, general US-English model
    text = transcriber.transcribe(audio, sample_rate=24_000)       # float32 [N] (or [N, C]) -> str, "" for silence

Backends:
- `pocketsphinx` (default): the acoustic model, language model and CMU dictionary that ship in the pocketsphinx
  wheel (general English, so users may say anything). Small and CPU-only; accuracy is modest.
- `transformers`: any transformers speech-recognition model (Whisper, wav2vec2 CTC, ...) from a local directory or
  a hub id `org/name[@revision]` (resolved by `csm_jax.hub.resolve`), run on CPU by default through the
  transformers ASR pipeline. transformers and torch are imported only when this backend is built.
- `none`: no transcription (`build_transcriber` returns None).

Both transcribers serialise their calls with a lock (the recognisers are not thread-safe), so one instance may be
shared by worker threads; calls run one at a time. Any recogniser failure raises `TranscriptionError` naming the
backend; invalid audio raises `InvalidAudioError` (a `TranscriptionError` and a `ValueError`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import soxr

BACKENDS = ("pocketsphinx", "transformers", "none")
POCKETSPHINX_RATE = 16_000  # the bundled en-us acoustic model's sample rate
_POCKETSPHINX_LANGUAGES = (None, "en", "en-us")
_DITHER_LSB = 1.0


class TranscriptionError(Exception):
    """The recogniser failed (model load or decoding); the message names the backend."""


class InvalidAudioError(TranscriptionError, ValueError):
    """The audio handed to `transcribe` is not usable (empty, non-finite, wrong shape or sample rate)."""


@dataclass(frozen=True)
class TranscriberConfig:
    """The `transcriber:` config section.

    backend: "pocketsphinx" | "transformers" | "none".
    model: transformers backend only (required there): a local directory or hub id `org/name[@revision]`.
    language: Whisper models: the spoken language ("en", "english", ...; None: detected). pocketsphinx: None, "en"
        or "en-us" (its bundled model is US English). Other transformers models are monolingual: None.
    device: transformers backend: the torch device ("cpu", "cuda:0", ...).
    """

    backend: str = "pocketsphinx"
    model: str | None = None
    language: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"transcriber.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "transformers" and not self.model:
            raise ValueError("transcriber.backend=transformers needs transcriber.model (a local path or hub id)")
        if self.backend != "transformers" and self.model is not None:
            raise ValueError(f"transcriber.model is only used by backend=transformers (backend is {self.backend!r})")
        if self.backend == "pocketsphinx" and self.language not in _POCKETSPHINX_LANGUAGES:
            raise ValueError(f"the pocketsphinx model is US English: transcriber.language must be null, 'en' or "
                             f"'en-us', got {self.language!r}")


class Transcriber(Protocol):
    """Speech -> text. Implementations serialise concurrent calls (safe to share across threads)."""

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """`audio` float [N] (or [N, C], averaged to mono) at `sample_rate` Hz -> the transcript ("" when no words
        are heard). Raises InvalidAudioError for unusable audio, TranscriptionError when the recogniser fails."""
        ...


def build_transcriber(cfg: TranscriberConfig) -> Transcriber | None:
    """The transcriber `cfg` describes (loaded now, so a bad model fails at start-up), or None for backend=none.
    Raises TranscriptionError when the recogniser cannot be loaded."""
    if cfg.backend == "none":
        return None
    if cfg.backend == "pocketsphinx":
        return PocketsphinxTranscriber()
    assert cfg.model is not None  # checked by TranscriberConfig
    return TransformersTranscriber(cfg.model, language=cfg.language, device=cfg.device)


def _mono(audio: np.ndarray, sample_rate: int, backend: str) -> np.ndarray:
    """Validated float32 mono [N] from float [N] or [N, C]."""
    x = np.asarray(audio)
    if x.dtype.kind != "f":
        raise InvalidAudioError(f"{backend} transcriber: audio must be float samples in [-1, 1], got dtype {x.dtype}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidAudioError(f"{backend} transcriber: sample_rate must be a positive int, got {sample_rate!r}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InvalidAudioError(f"{backend} transcriber: audio must be non-empty float [N] or [N, C], got shape "
                                f"{list(np.shape(audio))}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidAudioError(f"{backend} transcriber: audio holds non-finite samples (NaN or inf)")
    return x


class PocketsphinxTranscriber:
    """pocketsphinx with the general US-English model bundled in its wheel (acoustic model `en-us`, the `en-us.lm.bin`
    trigram language model, `cmudict-en-us.dict`). Audio is resampled to 16 kHz with soxr, dithered, and decoded as one
    utterance. Calls are serialised by a lock."""

    backend = "pocketsphinx"

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder, get_model_path

            root = os.path.join(get_model_path(), "en-us")
            self._decoder = Decoder(hmm=os.path.join(root, "en-us"), lm=os.path.join(root, "en-us.lm.bin"),
                                    dict=os.path.join(root, "cmudict-en-us.dict"), samprate=POCKETSPHINX_RATE,
                                    logfn=os.devnull)
        except ImportError as e:
            raise TranscriptionError(f"pocketsphinx transcriber: the pocketsphinx package is not installed "
                                     f"(pip install pocketsphinx): {e}") from e
        except Exception as e:  # any load failure is reported as the recogniser's
            raise TranscriptionError(f"pocketsphinx transcriber: cannot load the bundled en-us model: {e}") from e
        self._lock = threading.Lock()

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """float [N] or [N, C] at `sample_rate` -> lowercase words ("" for silence or noise)."""
        x = _mono(audio, sample_rate, self.backend)
        if sample_rate != POCKETSPHINX_RATE:
            x = soxr.resample(x, sample_rate, POCKETSPHINX_RATE)
        if x.size < POCKETSPHINX_RATE // 40:  # shorter than one 25 ms analysis frame: nothing to hear
            return ""
        # Dither (Gaussian, 1 LSB, fixed seed: the same audio gives the same text): runs of digital zeros (muted
        # microphones, synthetic speech's pauses) otherwise break the recogniser's log-energy features and it
        # hallucinates words in silence.
        pcm = np.clip(x, -1.0, 1.0) * 32767 + np.random.default_rng(0).normal(0.0, _DITHER_LSB, x.shape)
        pcm = np.clip(np.rint(pcm), -32768, 32767).astype("<i2").tobytes()
        with self._lock:
            try:
                self._decoder.start_utt()
                self._decoder.process_raw(pcm, full_utt=True)
                self._decoder.end_utt()
                hyp = self._decoder.hyp()
            except Exception as e:
                raise TranscriptionError(f"pocketsphinx transcriber: recognition failed: {e}") from e
        return "" if hyp is None else " ".join(hyp.hypstr.split())


class TransformersTranscriber:
    """A transformers speech-recognition model (`model_ref`: local directory or hub id `org/name[@revision]`) run by
    the transformers ASR pipeline on `device`. Audio is resampled with soxr to the feature extractor's rate; Whisper
    audio over 30 s takes its long-form (timestamped) path. `language` applies to Whisper models only. The returned
    text is the pipeline's, with surrounding whitespace removed. Calls are serialised by a lock."""

    backend = "transformers"

    def __init__(self, model_ref: str, *, language: str | None = None, device: str = "cpu") -> None:
        from csm_jax.hub import resolve

        self.model_ref = model_ref
        try:
            local = resolve(model_ref)
        except Exception as e:  # FileNotFoundError, PermissionError, hub errors
            raise TranscriptionError(f"transformers transcriber: cannot find model {model_ref}: {e}") from e
        try:
            from transformers import pipeline
        except ImportError as e:
            raise TranscriptionError(f"transformers transcriber: transformers (with torch) is not installed "
                                     f"(pip install transformers torch): {e}") from e
        try:
            self._pipe = pipeline("automatic-speech-recognition", model=str(local), device=device)
        except Exception as e:  # corrupt or incompatible model directories fail in many ways
            raise TranscriptionError(f"transformers transcriber: cannot load speech-recognition model {model_ref} "
                                     f"({local}): {type(e).__name__}: {e}") from e
        if self._pipe.feature_extractor is None or self._pipe.tokenizer is None:
            raise TranscriptionError(f"transformers transcriber: model {model_ref} lacks its feature extractor or "
                                     "tokenizer files (save the processor with the model)")
        self.sample_rate = int(self._pipe.feature_extractor.sampling_rate)
        self._generate_kwargs: dict[str, Any] = {}
        if language is not None:
            if self._pipe.model.config.model_type != "whisper":
                raise ValueError(f"transcriber.language is only used by Whisper models; {model_ref} is a "
                                 f"{self._pipe.model.config.model_type!r} model: leave language null")
            self._generate_kwargs = {"language": language, "task": "transcribe"}
        self._lock = threading.Lock()

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """float [N] or [N, C] at `sample_rate` -> the model's transcript (whitespace-stripped)."""
        x = _mono(audio, sample_rate, self.backend)
        if sample_rate != self.sample_rate:
            x = soxr.resample(x, sample_rate, self.sample_rate)
        kwargs = {"generate_kwargs": dict(self._generate_kwargs)} if self._generate_kwargs else {}
        with self._lock:
            try:
                out = self._pipe({"raw": x, "sampling_rate": self.sample_rate}, **kwargs)
            except Exception as e:
                raise TranscriptionError(f"transformers transcriber ({self.model_ref}): recognition failed: "
                                         f"{type(e).__name__}: {e}") from e
        return str(out["text"]).strip()
