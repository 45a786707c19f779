"""Voice presets shipped with a model: named reference turns (transcripts and their recordings, one speaker) that
prompt the voice of a speaker whose own audio is not in the context, as the CSM reference's demo prompts its
speakers with recorded segments.

A model directory lists them in `voices.json`, audio paths relative to the directory (any format
`csm_jax.audio.load_audio` reads; resampled to 24 kHz). A preset is one turn or several, oldest first:

    {"default": {"turns": [{"text": "It was great.", "audio": "voices/default_0.wav"},
                           {"text": "See you then.", "audio": "voices/default_1.wav"}]},
     "short": {"text": "Hello there.", "audio": "voices/short.wav"}}

The preset named "default" speaks when a request names none. When and where a preset goes into a prompt is the
conversation format's rule (`csm_jax.csm.prompt`): only for a turn whose context holds no audio of its speaker.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from csm_jax.audio import AudioError, load_audio
from csm_jax.audio.processor import SAMPLE_RATE

VOICES_FILE = "voices.json"
VOICES_DIR = "voices"
DEFAULT_VOICE = "default"
MAX_SECONDS = 30.0  # all turns of a preset together; more would crowd out the conversation
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True, eq=False)
class VoicePreset:
    """name; turns: (transcript, float32 [N] mono audio at 24 kHz) per reference turn, oldest first."""

    name: str
    turns: tuple[tuple[str, np.ndarray], ...]


def check_name(name: str) -> str:
    """A preset name: 1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a voice name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                         f"digit), got {name!r:.80}")
    return name


def _entry_turns(entry: Any) -> list[Any]:
    """A voices.json entry -> its turn objects (the one-turn shorthand is the turn itself)."""
    if isinstance(entry, dict) and set(entry) == {"turns"} and isinstance(entry["turns"], list) and entry["turns"]:
        return entry["turns"]
    if isinstance(entry, dict) and set(entry) == {"text", "audio"}:
        return [entry]
    raise ValueError("expected {\"text\", \"audio\"} or {\"turns\": [{\"text\", \"audio\"}, ...]} (at least one turn)")


def read_voices(directory: str | Path) -> dict[str, VoicePreset]:
    """`<directory>/voices.json` and its recordings -> {name: VoicePreset} ({} when there is no such file).
    Raises ValueError naming the file and preset for malformed JSON, bad names or fields, and missing, unreadable,
    empty or over-long (> 30 s a preset) audio."""
    root = Path(directory)
    path = root / VOICES_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected an object of voice name -> preset")
    voices = {}
    for name, entry in entries.items():
        where = f"{path}: voice {name!r:.80}"
        try:
            check_name(name)
            turns = []
            for turn in _entry_turns(entry):
                if not isinstance(turn, dict) or set(turn) != {"text", "audio"}:
                    raise ValueError("each turn needs exactly the keys 'text' and 'audio'")
                text, audio = turn["text"], turn["audio"]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("'text' must be a non-empty string")
                if not isinstance(audio, str) or not audio or Path(audio).is_absolute() or ".." in Path(audio).parts:
                    raise ValueError(f"'audio' must be a path inside {root}")
                turns.append((text.strip(), load_audio(root / audio, max_seconds=MAX_SECONDS)))
            _check_length(turns)
        except (ValueError, AudioError) as e:
            raise ValueError(f"{where}: {e}") from None
        voices[name] = VoicePreset(name, tuple(turns))
    return voices


def _check_length(turns: Sequence[tuple[str, np.ndarray]]) -> None:
    seconds = sum(a.size for _, a in turns) / SAMPLE_RATE
    if seconds > MAX_SECONDS:
        raise ValueError(f"a voice preset may hold at most {MAX_SECONDS:g} s of audio, got {seconds:.1f} s")


def save_voice(directory: str | Path, name: str, turns: Sequence[tuple[str, np.ndarray]],
               sample_rate: int = SAMPLE_RATE) -> list[Path]:
    """Add (or replace) preset `name` of a model directory: turns (transcript, float [N] mono audio in [-1, 1]),
    oldest first, written as `voices/<name>_<i>.wav` (PCM16, resampled to 24 kHz) with the `voices.json` entry.
    -> the wavs' paths."""
    root = Path(directory)
    check_name(name)
    clean = []
    for text, audio in turns:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("each turn's text must be a non-empty string")
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"each turn's audio must be non-empty mono [N], got shape {list(audio.shape)}")
        if sample_rate != SAMPLE_RATE:
            import soxr

            audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
        clean.append((text.strip(), audio))
    if not clean:
        raise ValueError("a voice preset needs at least one turn")
    _check_length(clean)
    read_voices(root)  # the presets already there must be sound before the file is rewritten
    entries = json.loads((root / VOICES_FILE).read_text()) if (root / VOICES_FILE).is_file() else {}
    (root / VOICES_DIR).mkdir(parents=True, exist_ok=True)
    wavs, listed = [], []
    for i, (text, audio) in enumerate(clean):
        wav = root / VOICES_DIR / f"{name}_{i}.wav"
        sf.write(wav, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
        wavs.append(wav)
        listed.append({"text": text, "audio": f"{VOICES_DIR}/{wav.name}"})
    for stale in (root / VOICES_DIR).glob(f"{name}_*.wav"):  # a replaced preset's extra turns
        if re.fullmatch(rf"{re.escape(name)}_\d+\.wav", stale.name) and stale not in wavs:
            stale.unlink()
    entries[name] = {"turns": listed}
    (root / VOICES_FILE).write_text(json.dumps(entries, indent=2) + "\n")
    return wavs


def resolve(voices: Mapping[str, VoicePreset], name: str | None) -> VoicePreset | None:
    """The preset a request names: None -> none; "default" -> the model's default preset, or none if it has
    none; any other name must be one of `voices` (ValueError listing them)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"voice must be a preset name or None, got {name!r:.80}")
    if name in voices:
        return voices[name]
    if name == DEFAULT_VOICE:
        return None
    raise ValueError(f"unknown voice {name!r:.80}; this model has {sorted(voices) or 'none'}")
