"""Training corpus manifests: JSON Lines, one utterance per line.

    {"audio": "wavs/c0001_00.wav", "text": "Hello there.", "speaker": 0, "conversation": "c0001", "turn": 0}

`audio` is relative to the manifest's directory (or absolute); `speaker` and `turn` are non-negative ints;
`(conversation, turn)` is unique. Any other keys are kept in `Utterance.extra`. Blank lines are ignored.
`read_manifest` raises `ManifestError` naming `file:line` for the first malformed line, and lists the missing
audio files (up to ten by name) when some do not exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

FIELDS = ("audio", "text", "speaker", "conversation", "turn")
_MAX_NAMED = 10


class ManifestError(ValueError):
    """The manifest is missing, malformed, empty, or names audio files that do not exist."""


@dataclass(frozen=True)
class Utterance:
    """One manifest line. `audio` is resolved to an absolute path; `source` is `manifest:line` for messages."""

    audio: Path
    text: str
    speaker: int
    conversation: str
    turn: int
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, hash=False)
    source: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return self.conversation, self.turn


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(record: dict[str, Any], where: str) -> None:
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}")
    checks = {
        "audio": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string (a path)"),
        "text": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
        "speaker": (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
        "conversation": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "turn": (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
    }
    for name, (ok, what) in checks.items():
        value = record[name]
        if not ok(value):
            raise ManifestError(f"{where}: field {name!r} must be {what}, got {value!r} ({type(value).__name__})")


def read_manifest(path: str | os.PathLike[str], check_audio: bool = True) -> list[Utterance]:
    """Parse and validate a JSONL manifest -> utterances in file order (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = path.resolve().parent
    utterances: list[Utterance] = []
    first_line: dict[tuple[str, int], int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        _check_fields(record, where)
        key = (record["conversation"], record["turn"])
        if key in first_line:
            raise ManifestError(f"{where}: duplicate (conversation {key[0]!r}, turn {key[1]}); "
                                f"first at line {first_line[key]}")
        first_line[key] = lineno
        audio = Path(record["audio"])
        extra = {k: v for k, v in record.items() if k not in FIELDS}
        utterances.append(Utterance(
            audio=audio if audio.is_absolute() else base / audio, text=record["text"], speaker=record["speaker"],
            conversation=record["conversation"], turn=record["turn"], extra=MappingProxyType(extra), source=where,
        ))
    if not utterances:
        raise ManifestError(f"{path}: empty corpus (no utterances)")
    if check_audio:
        missing = [u for u in utterances if not u.audio.is_file()]
        if missing:
            named = "; ".join(f"line {u.source.rsplit(':', 1)[1]}: {u.audio}" for u in missing[:_MAX_NAMED])
            more = f" (and {len(missing) - _MAX_NAMED} more)" if len(missing) > _MAX_NAMED else ""
            raise ManifestError(f"{path}: {len(missing)} audio file(s) not found: {named}{more}")
    return utterances


def write_manifest(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """Write records as JSONL (atomically: a temporary file, then rename) -> the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
