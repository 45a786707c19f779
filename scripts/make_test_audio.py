"""Generate the synthetic speech clips in ``tests/data/`` with espeak-ng.

Run from the repository root (needs the ``espeak-ng`` binary, numpy, soundfile, soxr):

    python scripts/make_test_audio.py

Voices, speed and pitch are fixed, so the output only depends on the espeak-ng version.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"

SHORT = "Hello there."
MEDIUM = "The quick brown fox jumps over the lazy dog."
LONG = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman. "
    "Every morning he rowed his boat out and cast his nets into "
    "the cold water. Most days he caught only a few fish, but he always came "
    "home singing."
)
STEREO = "Left and right, together."


def espeak(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Synthesise ``text``; returns float32 mono samples [N] and their sample rate."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return samples, rate


def write(name: str, samples: np.ndarray, rate: int, out_rate: int) -> None:
    """Resample [N] or [N, C] float samples to ``out_rate`` and write them as PCM16 WAV."""
    out = soxr.resample(samples, rate, out_rate, quality="HQ")
    path = OUT_DIR / name
    sf.write(path, np.clip(out, -1.0, 1.0), out_rate, subtype="PCM_16")
    print(f"{path.name}: {len(out) / out_rate:.2f} s, {path.stat().st_size} bytes")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write("speech_1s.wav", *espeak(SHORT), 24_000)
    write("speech_3s.wav", *espeak(MEDIUM), 24_000)
    write("speech_14s.wav", *espeak(LONG), 24_000)

    (left, rate), (right, _) = espeak(STEREO, pitch=35), espeak(STEREO, voice="en-gb", pitch=70)
    stereo = np.zeros((max(len(left), len(right)), 2), np.float32)
    stereo[: len(left), 0] = left
    stereo[: len(right), 1] = right
    write("speech_stereo_44k.wav", stereo, rate, 44_100)


if __name__ == "__main__":
    main()
