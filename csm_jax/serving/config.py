"""Typed server configuration, built from the Hydra config (`configs/serve.yaml`) with unknown keys rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    codec: str | None = None
    num_codebooks: int | None = None
    dtype: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 8
    warmup_rows: int = 2048
    compile_cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlite"
    path: str = "outputs/conversations.db"


@dataclasses.dataclass(frozen=True)
class NetConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    static_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1 << 20
    max_text_chars: int = 1000
    max_audio_s: float = 60.0
    max_audio_ms: int = 30_000
    max_requests: int = 1000


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 0.9
    top_k: int = 50
    max_audio_ms: int = 10_000


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    max_turns: int = 16


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    storage: StorageConfig = StorageConfig()
    server: NetConfig = NetConfig()
    limits: Limits = Limits()
    generation: GenerationDefaults = GenerationDefaults()
    context: ContextConfig = ContextConfig()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeConfig":
        """From a plain nested dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`); unknown keys raise."""
        return _build(cls, d, "")

    @property
    def static_dir(self) -> Path:
        if self.server.static_dir is not None:
            return Path(self.server.static_dir)
        return Path(__file__).resolve().parents[2] / "serve" / "static"


def _build(cls: type[T], d: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"known under {where or 'the root'}: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config {where}{name} must be a mapping, got {value!r}")
            value = _build(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple):
            value = tuple(value or ())
        kwargs[name] = value
    return cls(**kwargs)
