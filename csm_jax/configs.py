"""Typed configs from plain nested dicts (resolved Hydra configs): unknown keys are errors, lists become tuples."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], d: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `d`, recursing into dataclass-typed fields (those whose default, or default
    factory, is a dataclass); raises ValueError naming any unknown key and the known ones."""
    if not isinstance(d, dict):
        raise ValueError(f"config {where.rstrip('.') or 'root'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"known under {where.rstrip('.') or 'the root'}: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        field = fields[name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default) and value is not None:
            value = from_dict(type(default), value, f"{where}{name}.")
        kwargs[name] = _tuples(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {where.rstrip('.') or 'root'}: {e}") from e


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
