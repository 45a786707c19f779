"""Text front ends: what a turn's text becomes before tokenisation.

- `"text"` (the official CSM-1B): the text as written.
- `"espeak:<voice>"` (the default voice): IPA phonemes with stress marks from eSpeak NG, through the `phonemizer`
  library and the eSpeak NG library and data shipped in the `espeakng-loader` wheel (no system package needed).
  A small model learns speech from phonemes far faster than from spelling.

    frontend = make_frontend("espeak:en-us")
    frontend("Hello there.")      # 'həlˈoʊ ðˈɛɹ.'
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Protocol


class TextFrontend(Protocol):
    name: str

    def __call__(self, text: str) -> str: ...


class PlainText:
    """The text unchanged."""

    name = "text"

    def __call__(self, text: str) -> str:
        return text


class EspeakPhonemes:
    """eSpeak NG phonemes (IPA, stress marks, punctuation kept) for `voice` (an eSpeak language/voice name)."""

    def __init__(self, voice: str = "en-us") -> None:
        import espeakng_loader
        from phonemizer.backend import EspeakBackend
        from phonemizer.backend.espeak.wrapper import EspeakWrapper

        EspeakWrapper.set_library(espeakng_loader.get_library_path())
        EspeakWrapper.set_data_path(espeakng_loader.get_data_path())
        self.name = f"espeak:{voice}"
        # phonemizer warns "words count mismatch" whenever punctuation is kept; the phonemes are right
        quiet = logging.getLogger("csm_jax.frontend.phonemizer")
        quiet.setLevel(logging.ERROR)
        self._backend = EspeakBackend(voice, preserve_punctuation=True, with_stress=True, logger=quiet)
        self._lock = threading.Lock()  # the eSpeak library is not re-entrant

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one instance per voice, kept for the process)
    def __call__(self, text: str) -> str:
        with self._lock:
            return self._backend.phonemize([text], strip=True)[0]


@functools.lru_cache(maxsize=None)
def make_frontend(spec: str | None) -> TextFrontend:
    """"text" / None -> PlainText; "espeak:<voice>" -> EspeakPhonemes (one shared instance per spec)."""
    if spec in (None, "text"):
        return PlainText()
    kind, _, arg = spec.partition(":")
    if kind == "espeak" and arg:
        return EspeakPhonemes(arg)
    raise ValueError(f"unknown text front end {spec!r}: use 'text' or 'espeak:<voice>' (e.g. espeak:en-us)")
