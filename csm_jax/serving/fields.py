"""Validation of client-supplied event fields (WebSocket events and HTTP JSON bodies alike): every bad value is a
`ProtocolError` with a stable code and a message naming the field, never an exception from deeper down."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


class ProtocolError(Exception):
    """A request the server refuses: `code` (docs/protocol.md) and a message for the user."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


MAX_ID_CHARS = 256


def parse_object(text: str | bytes) -> dict[str, Any]:
    """A JSON object, or ProtocolError `bad_json` (not JSON, not an object, too deep, integers too long)."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"not valid JSON: {e}") from None
    except (RecursionError, ValueError) as e:  # nesting too deep, an integer with too many digits, bad UTF-8
        raise ProtocolError("bad_json", f"JSON the server does not accept: {type(e).__name__}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError("bad_json", f"expected a JSON object, got {type(parsed).__name__}")
    return parsed


def int_field(msg: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(name, default)
    if value is None:
        raise ProtocolError("bad_field", f"missing field {name!r} (int in {lo}..{hi})")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError("bad_field", f"field {name!r} must be an int in {lo}..{hi}, got {value!r}")
    return value


def float_field(msg: dict[str, Any], name: str, default: float) -> float:
    value = msg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ProtocolError("bad_field", f"field {name!r} must be a finite number > 0, got {value!r}")
    return float(value)


def is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800") decode from JSON but are not text
        return False
    return True


def str_field(msg: dict[str, Any], name: str, max_chars: int, default: str | None = None) -> str:
    value = msg.get(name, default)
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"field {name!r} must be a string, got {type(value).__name__}")
    if not is_unicode(value):
        raise ProtocolError("bad_field", f"field {name!r} is not valid Unicode (it has a lone surrogate)")
    if len(value) > max_chars:
        raise ProtocolError("text_too_long", f"field {name!r} has {len(value)} characters, over the limit of "
                                             f"{max_chars}")
    return value


def valid_id(value: Any) -> bool:
    """Event ids the server echoes: short strings, ints of at most 64 bits, finite floats."""
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS and is_unicode(value)
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and -(2**63) <= value < 2**63) or (isinstance(value, float) and math.isfinite(value))
