"""Offline speech synthesisers run as programs: espeak-ng, flite and festival (all Debian packages).

    voice = Voice("flite", "slt")
    synthesise(voice, "Hello there.", Path("hello.wav"))   # mono 16-bit WAV at the engine's own sample rate

A `Voice` (an engine, one of its voices and optional pitch and speed) is one speaker of a corpus. `default_voices()`
is the multi-speaker set of the speech corpus: espeak-ng accents x variants x pitch/speed, flite's built-in voices
and the installed festival voices. Writes are atomic (a temporary file, then rename); a missing program or a failed
synthesis raises `CorpusError` naming the program and the Debian package that provides it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# engine -> (program, Debian package)
ENGINES = {"espeak-ng": ("espeak-ng", "espeak-ng"), "flite": ("flite", "flite"), "festival": ("text2wave", "festival")}
FESTIVAL_PACKAGES = {"voice_kal_diphone": "festvox-kallpc16k", "voice_ked_diphone": "festvox-kdlpc16k",
                     "voice_cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}
_FESTIVAL_NAME = re.compile(r"voice_[a-z0-9_]+")
_TIMEOUT_S = 120


class CorpusError(RuntimeError):
    """A synthesiser (or one of its voices) is missing or failed."""


@dataclass(frozen=True)
class Voice:
    """One speaker: a synthesiser `engine`, its voice `name`, and `pitch`/`speed` in the engine's units (None: its
    default).

    espeak-ng: name as `espeak-ng --voices` lists it, with an optional variant ("en-gb-scotland+f3"); pitch 0..99
        (`-p`), speed in words per minute (`-s`, 80..450).
    flite: a built-in voice of `flite -lv`; pitch is the mean F0 in Hz, speed a percentage of the normal rate.
    festival: a voice function ("voice_kal_diphone"); no pitch or speed.
    """

    engine: str
    name: str
    pitch: int | None = None
    speed: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; known: {sorted(ENGINES)}")
        if self.engine == "festival":
            if not _FESTIVAL_NAME.fullmatch(self.name):
                raise ValueError(f"festival voice must look like voice_<name>, got {self.name!r}")
            if self.pitch is not None or self.speed is not None:
                raise ValueError(f"festival voice {self.name}: pitch and speed are not supported")
        ranges = {"espeak-ng": ((0, 99), (80, 450)), "flite": ((50, 400), (25, 400))}.get(self.engine)
        for what, value, (lo, hi) in zip(("pitch", "speed"), (self.pitch, self.speed), ranges or ()):
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{self.engine} voice {self.name}: {what} must be in [{lo}, {hi}], got {value}")

    def label(self) -> str:
        """engine:name, then p<pitch> and s<speed> when set: "espeak-ng:en-gb+f3 p70 s160", "flite:slt"."""
        parts = [f"{self.engine}:{self.name}"]
        parts += [f"p{self.pitch}"] if self.pitch is not None else []
        parts += [f"s{self.speed}"] if self.speed is not None else []
        return " ".join(parts)


def program(engine: str) -> str:
    """The path of `engine`'s program; raises CorpusError naming the Debian package when it is not installed."""
    exe, package = ENGINES[engine]
    path = shutil.which(exe)
    if path is None:
        raise CorpusError(f"{exe} is not installed (the {engine} synthesiser; on Debian/Ubuntu: "
                          f"apt-get install {package})")
    return path


@functools.cache
def _flite_voices(exe: str) -> frozenset[str]:
    """Names of flite's built-in voices (flite silently falls back to its default for an unknown name)."""
    out = subprocess.run([exe, "-lv"], check=False, capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    return frozenset(out.split(":", 1)[-1].split())


def _command(voice: Voice, exe: str, text: str, out: Path) -> tuple[list[str], str | None]:
    """The command line writing `out` and its standard input."""
    if voice.engine == "espeak-ng":
        options = (["-p", str(voice.pitch)] if voice.pitch is not None else []) + \
                  (["-s", str(voice.speed)] if voice.speed is not None else [])
        return [exe, "-v", voice.name, *options, "-w", str(out), "--stdin"], text
    if voice.engine == "flite":
        if voice.name not in _flite_voices(exe):
            raise CorpusError(f"flite has no voice {voice.name!r}; it has {sorted(_flite_voices(exe))}")
        options = (["--setf", f"int_f0_target_mean={voice.pitch}"] if voice.pitch is not None else []) + \
                  (["--setf", f"duration_stretch={100 / voice.speed:.4f}"] if voice.speed is not None else [])
        return [exe, "-voice", voice.name, *options, "-t", text, "-o", str(out)], None
    return [exe, "-eval", f"({voice.name})", "-o", str(out)], text


def synthesise(voice: Voice, text: str, path: str | os.PathLike[str]) -> Path:
    """Speak `text` with `voice` into the WAV file `path` (mono int16, written atomically) -> the path."""
    path = Path(path)
    if not text.strip():
        raise ValueError(f"nothing to say for {path.name}: empty text")
    exe = program(voice.engine)
    tmp = path.with_name(path.stem + ".tmp.wav")
    cmd, stdin = _command(voice, exe, text, tmp)
    try:
        proc = subprocess.run(cmd, check=False, input=None if stdin is None else stdin.encode(),
                              capture_output=True, timeout=_TIMEOUT_S)
        err = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        ok = proc.returncode == 0 and tmp.is_file() and tmp.stat().st_size > 44  # more than a WAV header
    except subprocess.TimeoutExpired:
        ok, err = False, f"no result after {_TIMEOUT_S} s"
    if not ok:
        tmp.unlink(missing_ok=True)
        hint = f" (is {FESTIVAL_PACKAGES[voice.name]} installed?)" if voice.name in FESTIVAL_PACKAGES else ""
        raise CorpusError(f"{voice.engine} failed for voice {voice.name!r} ({path.name}): {err}{hint}")
    os.replace(tmp, path)
    return path


_ESPEAK = (  # accent+variant, pitch, speed: one male and one female variant per accent, pitches spread over 22..90
    ("en-us+m1", 40, 165), ("en-us+f2", 70, 170), ("en-gb+m3", 55, 150), ("en-gb+f1", 80, 160),
    ("en-gb-scotland+m2", 50, 175), ("en-gb-scotland+f3", 82, 165), ("en-gb-x-rp+m4", 22, 145),
    ("en-gb-x-rp+f4", 55, 150), ("en-029+m5", 45, 180), ("en-029+f5", 75, 175), ("en-gb-x-gbclan+m6", 30, 160),
    ("en-gb-x-gbclan+f2", 90, 155), ("en-us-nyc+m7", 58, 185), ("en-us-nyc+f4", 48, 190),
    ("en-gb-x-gbcwmd+m8", 35, 140), ("en-us+f3", 60, 135),
)
_FLITE = (("kal", None, None), ("kal16", 135, 85), ("awb", None, None), ("rms", None, None), ("slt", None, None))
_FESTIVAL = ("voice_kal_diphone", "voice_ked_diphone", "voice_cmu_us_slt_arctic_hts")


def default_voices() -> tuple[Voice, ...]:
    """The speech corpus's speakers in speaker-id order: 16 espeak-ng, 5 flite and 3 festival voices.

    Raises CorpusError when one of the three programs is missing (no voice is skipped)."""
    for engine in ENGINES:
        program(engine)
    return (*(Voice("espeak-ng", n, p, s) for n, p, s in _ESPEAK), *(Voice("flite", n, p, s) for n, p, s in _FLITE),
            *(Voice("festival", n) for n in _FESTIVAL))
