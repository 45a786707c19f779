"""Top-k + temperature sampling with per-row parameters and explicit PRNG keys, and a model's sampling settings
(`Sampling`, kept in transformers' `generation_config.json`)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 [..] -> uint32 keys with the same order (-0.0 and 0.0 equal; -inf lowest)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits & sign, ~bits, bits | sign)


def kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
    """x float [B, V], k int32 [B] -> [B, 1]: each row's k-th largest value, duplicates counted (k clipped to
    1..V). Exact, without a sort or a branch: the value's order key is built bit by bit from the top (32 count
    passes over the row, unrolled), the largest key t with at least k entries >= t. No data-dependent control
    flow, so one compiled serving frame holds no conditional and no host synchronisation."""
    keys = _order_keys(x)
    need = jnp.clip(k, 1, x.shape[-1])[:, None]
    t = jnp.zeros(need.shape, jnp.uint32)
    for bit in range(31, -1, -1):
        cand = t | jnp.uint32(1 << bit)
        t = jnp.where(jnp.sum(keys >= cand, axis=-1, keepdims=True) >= need, cand, t)
    # the entry whose key is t: the largest value whose key is <= t
    return jnp.max(jnp.where(keys <= t, x, -jnp.inf), axis=-1, keepdims=True).astype(x.dtype)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits float32 [B, V], keys (B PRNG keys, one per row), temperature float32 [B] (> 0), top_k int32 [B]
    (>= 1) -> int32 [B]. Keeps every logit >= the k-th largest (ties kept), then draws from softmax(logits / T).
    top_k == 1 is greedy (argmax). Row i draws as `sample_top_k(logits[i:i+1], keys[i], ...)` does."""
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    masked = jnp.where(scaled >= kth_largest(scaled, top_k), scaled, -jnp.inf)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, masked)
    return jnp.where(top_k == 1, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def sample_top_k(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """logits float32 [B, V], key (one PRNG key), temperature float32 [B] (> 0), top_k int32 [B] (>= 1)
    -> int32 [B]. Keeps every logit >= the k-th largest (ties kept), then draws from softmax(logits / T).
    top_k == 1 is greedy (argmax)."""
    scaled = logits.astype(jnp.float32) / temperature[:, None]
    masked = jnp.where(scaled >= kth_largest(scaled, top_k), scaled, -jnp.inf)
    drawn = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(top_k == 1, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


GENERATION_CONFIG = "generation_config.json"


def _check_temperature(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_top_k(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (1: greedy), got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A model's sampling settings: `temperature`/`top_k` for codebook 0 (the backbone), `depth_temperature`/
    `depth_top_k` for codebooks 1..K-1 (the depth decoder). top_k 1 is greedy. Defaults: the CSM reference's
    (0.9, top 50, for both). A model directory may carry its own in transformers' `generation_config.json`
    (`read_sampling`), so a model trained here is served with the settings it was evaluated with."""

    temperature: float = 0.9
    top_k: int = 50
    depth_temperature: float = 0.9
    depth_top_k: int = 50

    def __post_init__(self) -> None:
        for name in ("temperature", "depth_temperature"):
            object.__setattr__(self, name, _check_temperature(name, getattr(self, name)))
        for name in ("top_k", "depth_top_k"):
            object.__setattr__(self, name, _check_top_k(name, getattr(self, name)))

    def override(self, temperature: float | None = None, top_k: int | None = None,
                 depth_temperature: float | None = None, depth_top_k: int | None = None) -> Sampling:
        """These settings with the given ones replaced (None keeps a setting). A `temperature` or `top_k` without
        its depth counterpart applies to every codebook (as csm-jax and the Sesame reference sample)."""
        t = self.temperature if temperature is None else temperature
        k = self.top_k if top_k is None else top_k
        dt = depth_temperature if depth_temperature is not None else (
            self.depth_temperature if temperature is None else temperature)
        dk = depth_top_k if depth_top_k is not None else (self.depth_top_k if top_k is None else top_k)
        return Sampling(t, k, dt, dk)

    def generation_config(self) -> dict[str, Any]:
        """As transformers' CSM `generation_config.json` holds them (greedy = `do_sample` false)."""
        return {"do_sample": self.top_k > 1, "temperature": self.temperature, "top_k": self.top_k,
                "depth_decoder_do_sample": self.depth_top_k > 1, "depth_decoder_temperature": self.depth_temperature,
                "depth_decoder_top_k": self.depth_top_k}

    @classmethod
    def from_generation_config(cls, config: dict[str, Any]) -> Sampling:
        """transformers' generation settings -> Sampling. `do_sample` false is greedy (top_k 1); absent keys keep
        the CSM reference's settings (a file transformers derived from the model config states none; transformers
        itself would decode such a model greedily)."""
        ref = cls()

        def part(prefix: str, temperature: float, top_k: int) -> tuple[float, int]:
            sample = config.get(f"{prefix}do_sample", True)
            return config.get(f"{prefix}temperature", temperature), (config.get(f"{prefix}top_k", top_k) if sample
                                                                      else 1)

        t, k = part("", ref.temperature, ref.top_k)
        dt, dk = part("depth_decoder_", ref.depth_temperature, ref.depth_top_k)
        return cls(t, k, dt, dk)

    def save(self, directory: str | Path) -> Path:
        """Write these settings as `<directory>/generation_config.json` (`read_sampling` and transformers read it)
        -> the file."""
        path = Path(directory) / GENERATION_CONFIG
        path.write_text(json.dumps(self.generation_config(), indent=2) + "\n")
        return path


def read_sampling(directory: str | Path) -> Sampling:
    """`<directory>/generation_config.json` as Sampling (the defaults when there is none); bad files raise
    ValueError."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return Sampling()
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return Sampling.from_generation_config(config)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
