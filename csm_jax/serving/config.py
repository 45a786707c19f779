"""Typed server configuration, built from the Hydra config (`configs/serve.yaml`) with unknown keys rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from csm_jax import sharding
from csm_jax.backend import PolicyOverrides
from csm_jax.configs import from_dict
from csm_jax.dialogue.responder import ResponderConfig
from csm_jax.dialogue.transcriber import TranscriberConfig
from csm_jax.dialogue.turn_taking import TurnTakingConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    codec: str | None = None
    num_codebooks: int | None = None
    dtype: str | None = None
    quantize: str | None = None  # int8 | bf16: weight-only projections and audio heads (csm_jax.csm.quantize)
    random_seed: int | None = None  # serve the tiny random model with this seed (csm_jax.default_model)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 16
    warmup_rows: int = 2048
    warmup_batched_rows: int = 256
    compile_cache_dir: str | None = None
    backend: PolicyOverrides = dataclasses.field(default_factory=PolicyOverrides)  # csm_jax.backend overrides


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh the model is served on: data x tensor over this host's devices (-1: the devices the other
    axis leaves). Requests (`batch` rows) go over data, attention heads and MLP over tensor (csm_jax.sharding).
    1 x 1 serves on one device, unsharded. `rules`: logical axis -> mesh axis (None: sharding.DEFAULT_RULES)."""

    data: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | None], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("data", "tensor"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name} must be a positive int or -1 (the rest of the devices), got {size!r}")
        if self.data == -1 and self.tensor == -1:
            raise ValueError("at most one of mesh.data and mesh.tensor may be -1")
        for rule in self.rules or ():
            if (not isinstance(rule, tuple) or len(rule) != 2 or not isinstance(rule[0], str)
                    or rule[1] not in ("data", "tensor", None)):
                raise ValueError(f"mesh.rules entries are [logical_axis, data|tensor|null], got {rule!r}")

    def resolved_rules(self) -> sharding.Rules:
        return sharding.DEFAULT_RULES if self.rules is None else self.rules


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    path: str = "outputs/conversations.db"  # SQLite, the embedded default
    url: str | None = None  # postgresql://user:pw@host:port/db: PostgreSQL (several servers on one history)


@dataclasses.dataclass(frozen=True)
class NetConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # configs/serve.yaml reads it from $CSM_JAX_TOKEN (never write it on the command line)
    token_file: str | None = None
    allowed_origins: tuple[str, ...] = ()  # empty: only the server's own page (its host:port, loopback names)
    allow_public_without_token: bool = False
    static_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1 << 20
    max_text_chars: int = 1000
    max_audio_s: float = 60.0
    max_audio_ms: int = 30_000
    requests_per_min: float = 120.0  # responses + audio turns per client address, across its reconnects ...
    request_burst: int = 60  # ... and their burst; over it: `rate_limited` (HTTP 429)
    max_body_bytes: int = 65536  # HTTP request bodies (the speech API's JSON)
    max_connections: int = 256  # open WebSockets, server-wide (more get HTTP 503)
    max_queued: int = 64  # responses waiting for an engine slot, server-wide (more get `overloaded` at once)
    max_conversations: int = 100  # conversations one connection may create
    messages_per_s: float = 50.0  # sustained message rate per connection (token bucket) ...
    message_burst: int = 200  # ... and its burst; excess messages are dropped with `rate_limited`


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling of requests that leave it out; None: the model's (its `generation_config.json`, or 0.9 / top 50).
    `temperature` / `top_k` without their `depth_` counterparts apply to every codebook."""

    temperature: float | None = None
    top_k: int | None = None
    depth_temperature: float | None = None
    depth_top_k: int | None = None
    max_audio_ms: int = 10_000
    voice: str | None = "default"  # the model's voice preset (voices.json) for requests that name none; None: none


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    max_turns: int | None = None  # context turns of a prompt; None: the model's (its prompt.json, else 16)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    mesh: MeshConfig = MeshConfig()
    storage: StorageConfig = StorageConfig()
    server: NetConfig = NetConfig()
    limits: Limits = Limits()
    generation: GenerationDefaults = GenerationDefaults()
    context: ContextConfig = ContextConfig()
    transcriber: TranscriberConfig = dataclasses.field(default_factory=TranscriberConfig)
    turn_taking: TurnTakingConfig = dataclasses.field(default_factory=lambda: TurnTakingConfig(vad=True))
    responder: ResponderConfig = dataclasses.field(default_factory=ResponderConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        """From a plain nested dict (e.g. `OmegaConf.to_container(cfg, resolve=True)`); unknown keys raise."""
        return from_dict(cls, d)

    @property
    def static_dir(self) -> Path:
        if self.server.static_dir is not None:
            return Path(self.server.static_dir)
        return Path(__file__).resolve().parent / "static"
