"""Public codec API: `load_codec(path)` -> `MimiCodec` with offline encode/decode and batched streaming."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from csm_jax import backend, checkpoint, hub
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.layers import State
from csm_jax.codec.mimi import Mimi, determines_codes
from csm_jax.codec.weights import abstract_params, convert_mimi, detect_format
from csm_jax.weights import read_safetensors

CHECKPOINT_KIND = "mimi"
ENCODE_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)  # frames of `encode_bucketed` (then multiples of 1024)
# what `load_codec` reads from a hub repo (kyutai/mimi, a CSM repo with `codec_model.*`, or a converted codec)
HUB_FILES = ("config.json", "model.safetensors", checkpoint.META_FILE, "params/*")


class MimiCodec:
    """Mimi: float32 audio [B, N] at 24 kHz <-> int32 codes [B, K, T] at 12.5 Hz (K <= 32 RVQ codebooks).

    `num_codebooks` is how many codebooks `encode` emits (1 semantic + num_codebooks-1 acoustic); `decode`
    accepts any K in 1..config.num_quantizers.
    """

    def __init__(self, params: Any, config: MimiConfig, num_codebooks: int | None = None):
        self.config = config
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.num_codebooks = config.num_quantizers if num_codebooks is None else num_codebooks
        if not 1 <= self.num_codebooks <= config.num_quantizers:
            raise ValueError(f"num_codebooks must be in 1..{config.num_quantizers}, got {self.num_codebooks}")
        self.module = Mimi(config)
        self._encode, self._decode = _offline_fns(config)

    @classmethod
    def random(cls, config: MimiConfig | None = None, seed: int = 0, num_codebooks: int | None = None) -> "MimiCodec":
        """A codec with seeded random weights (codebooks ~ N(0, 1)), for demos, tests and benchmarks."""
        config = config or MimiConfig()
        frame = jnp.zeros((1, config.frame_size), jnp.float32)
        params = backend.jit_init(lambda key: Mimi(config).init(key, frame)["params"])(jax.random.key(seed))
        return cls(params, config, num_codebooks)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_size(self) -> int:
        """Samples per codec frame (1920 = 80 ms at 24 kHz)."""
        return self.config.frame_size

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.frame_size)

    def encode(self, audio: Any) -> jax.Array:
        """audio float32 [B, N] (or [N]) at `sample_rate` -> int32 codes [B, K, ceil(N / frame_size)]."""
        audio = _check_audio(audio, batch_ndim=2)
        return self._encode(self.params, audio, self.num_codebooks)

    def encode_bucketed(self, audio: Any) -> jax.Array:
        """audio float32 [B, N] (or [N]) -> int32 codes [B, K, ceil(N / frame_size)] of the audio zero-padded to
        whole frames, which is what the streaming encoder (the server's audio turns) and dataset preparation
        give. Computed on a length bucket (`ENCODE_BUCKETS` frames) with more silence appended, so new lengths do
        not compile again; the encoder is causal, so the extra frames leave these codes unchanged. (`encode` of
        unpadded audio may differ in a partial last frame: offline Mimi pads its activations, not the audio.)"""
        audio = _check_audio(audio, batch_ndim=2)
        frames = self.num_frames(audio.shape[-1])
        return self._encode(self.params, self._pad_to_bucket(audio), self.num_codebooks)[..., :frames]

    def resynthesize(self, audio: Any) -> jax.Array:
        """audio float32 [B, N] (or [N]) -> its rendering by the codec (`encode_bucketed`, then decode), float32
        [B, N]. Encoded and decoded on the length bucket, so new lengths do not compile again (both halves are
        causal: the appended silence leaves the first N samples unchanged)."""
        audio = _check_audio(audio, batch_ndim=2)
        codes = self._encode(self.params, self._pad_to_bucket(audio), self.num_codebooks)
        return self._decode(self.params, codes)[:, : audio.shape[-1]]

    def _pad_to_bucket(self, audio: jax.Array) -> jax.Array:
        """float32 [B, N] -> [B, frame_size * bucket]: zeros appended up to the `ENCODE_BUCKETS` length (then
        multiples of 1024 frames) that holds ceil(N / frame_size) frames."""
        frames = self.num_frames(audio.shape[-1])
        padded = next((b for b in ENCODE_BUCKETS if b >= frames), -(-frames // 1024) * 1024)
        return jnp.pad(audio, ((0, 0), (0, padded * self.frame_size - audio.shape[-1])))

    def decode(self, codes: Any) -> jax.Array:
        """codes int [B, K, T] -> float32 audio [B, frame_size * T]."""
        codes = _check_codes(codes, self.config, ndim=3)
        return self._decode(self.params, codes)

    def stream_encoder(self, batch_size: int = 1) -> "StreamEncoder":
        return StreamEncoder(self, batch_size)

    def stream_decoder(self, batch_size: int = 1) -> "StreamDecoder":
        return StreamDecoder(self, batch_size)

    def code_differences(self, other: "MimiCodec", rtol: float = 5e-3) -> list[str]:
        """Where `other` would encode audio differently from this codec: the names of differing config fields
        (dtype aside) and the paths ("encoder/...", "quantizer/.../codebooks") of code-determining parameters
        that differ by more than `rtol` (relative to the largest magnitude of the tensor; the default passes a
        float16 or bfloat16 round trip). Empty for a codec with another decoder only (`codec_train=decoder`):
        a CSM trained on this codec's codes can use it."""
        a, b = self.config.to_dict(), other.config.to_dict()
        diffs = [k for k in sorted(a.keys() | b.keys()) if k != "dtype" and a.get(k) != b.get(k)]
        if diffs:
            return diffs
        mine = dict(jax.tree_util.tree_flatten_with_path(self.params)[0])
        for path, theirs in jax.tree_util.tree_flatten_with_path(other.params)[0]:
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            if not determines_codes(keys):
                continue
            ours = np.asarray(mine[path], np.float32)
            theirs = np.asarray(theirs, np.float32)
            scale = max(float(np.abs(ours).max(initial=0.0)), 1e-12)
            if ours.shape != theirs.shape or float(np.abs(ours - theirs).max(initial=0.0)) > rtol * scale:
                diffs.append("/".join(keys))
        return diffs

    def save(self, path: str | Path) -> Path:
        """Write a converted orbax checkpoint that `load_codec` reads back."""
        return checkpoint.save(path, self.params, CHECKPOINT_KIND, self.config.to_dict())


@functools.cache
def _offline_fns(cfg: MimiConfig) -> tuple[Any, Any]:
    """Jitted (encode, decode), shared by every codec with this config so each shape compiles once."""
    module = Mimi(cfg)
    encode = jax.jit(lambda p, audio, k: module.apply({"params": p}, audio, k, method=Mimi.encode), static_argnums=2)
    decode = jax.jit(lambda p, codes: module.apply({"params": p}, codes, method=Mimi.decode))
    return encode, decode


@functools.cache
def _stream_fns(cfg: MimiConfig, kind: str, batch_size: int, num_codebooks: int) -> tuple[Any, Any]:
    """Jitted (init_state(params), step(params, x, state)) for one stream kind, shared across instances."""
    module = Mimi(cfg)
    if kind == "encoder":
        init_method = Mimi.init_encoder_state
        step = lambda p, audio, state: module.apply(  # noqa: E731
            {"params": p}, audio, state, num_codebooks, method=Mimi.encode_step
        )
    else:
        init_method = Mimi.init_decoder_state
        step = lambda p, codes, state: module.apply({"params": p}, codes, state, method=Mimi.decode_step)  # noqa: E731
    init = jax.jit(lambda p: module.apply({"params": p}, batch_size, method=init_method))
    return init, jax.jit(step, donate_argnums=2)


@jax.jit
def restart_rows(fresh: State, state: State, mask: jax.Array) -> State:
    """Rows where mask [B] is True taken from `fresh`, the others kept from `state`."""
    return jax.tree_util.tree_map(
        lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (old.ndim - 1)), new, old), fresh, state)


class _Stream:
    """B independent streams advanced together; `state` is an explicit pytree, each step one jitted call."""

    kind: str

    def __init__(self, codec: MimiCodec, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.codec, self.batch_size = codec, batch_size
        self._init, self._step = _stream_fns(codec.config, self.kind, batch_size, codec.num_codebooks)
        self.state: State = self._init(codec.params)

    def reset(self, mask: Any = None) -> None:
        """Restart all streams, or only those where bool mask [B] is True."""
        fresh = self._init(self.codec.params)
        if mask is None:
            self.state = fresh
            return
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.shape != (self.batch_size,):
            raise ValueError(f"mask must have shape ({self.batch_size},), got {mask.shape}")
        self.state = restart_rows(fresh, self.state, mask)


class StreamEncoder(_Stream):
    """`step(audio float32 [B, frame_size]) -> int32 codes [B, K]`; equals offline encode on whole frames."""

    kind = "encoder"

    def step(self, audio: Any) -> jax.Array:
        audio = _check_audio(audio, batch_ndim=2, shape=(self.batch_size, self.codec.frame_size))
        codes, self.state = self._step(self.codec.params, audio, self.state)
        return codes


class StreamDecoder(_Stream):
    """`step(codes int [B, K]) -> float32 audio [B, frame_size]`; equals offline decode frame by frame."""

    kind = "decoder"

    def step(self, codes: Any) -> jax.Array:
        codes = _check_codes(codes, self.codec.config, ndim=2)
        if codes.shape[0] != self.batch_size:
            raise ValueError(f"expected codes for {self.batch_size} streams, got shape {codes.shape}")
        audio, self.state = self._step(self.codec.params, codes, self.state)
        return audio


def _check_audio(audio: Any, batch_ndim: int, shape: tuple[int, ...] | None = None) -> jax.Array:
    arr = audio if isinstance(audio, jax.Array) else np.asarray(audio)
    if not (jnp.issubdtype(arr.dtype, jnp.floating)):
        raise TypeError(f"audio must be a float array, got dtype {arr.dtype}")
    if arr.ndim == 1 and shape is None:
        arr = arr[None]
    if arr.ndim != batch_ndim or (shape is not None and tuple(arr.shape) != shape):
        want = list(shape) if shape is not None else "[B, N] or [N]"
        raise ValueError(f"audio must have shape {want}, got {list(arr.shape)}")
    if arr.shape[-1] == 0:
        raise ValueError("audio is empty (0 samples)")
    xp = jnp if isinstance(arr, jax.Array) else np
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError("audio contains NaN or infinite samples")
    return jnp.asarray(arr, jnp.float32)


def _check_codes(codes: Any, cfg: MimiConfig, ndim: int) -> jax.Array:
    arr = codes if isinstance(codes, jax.Array) else np.asarray(codes)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"codes must be an integer array, got dtype {arr.dtype}")
    layout = "[B, K, T]" if ndim == 3 else "[B, K]"
    if arr.ndim != ndim:
        raise ValueError(f"codes must have shape {layout}, got {list(arr.shape)}")
    k = arr.shape[1]
    if not 1 <= k <= cfg.num_quantizers:
        raise ValueError(f"codes have {k} codebooks; this codec has 1..{cfg.num_quantizers}")
    if ndim == 3 and arr.shape[2] == 0:
        raise ValueError("codes are empty (0 frames)")
    xp = jnp if isinstance(arr, jax.Array) else np
    lo, hi = (int(v) for v in np.asarray(xp.stack([xp.min(arr), xp.max(arr)])))  # one host transfer
    if lo < 0 or hi >= cfg.codebook_size:
        raise ValueError(f"codes must be in [0, {cfg.codebook_size}), got values in [{lo}, {hi}]")
    return jnp.asarray(arr, jnp.int32)


def _config_arg(config: MimiConfig | dict[str, Any] | None) -> MimiConfig | None:
    if config is None or isinstance(config, MimiConfig):
        return config
    return MimiConfig.from_hf(config) if "model_type" in config else MimiConfig.from_dict(config)


def load_codec(
    path: str | Path,
    *,
    num_codebooks: int | None = None,
    config: MimiConfig | dict[str, Any] | None = None,
    dtype: str | None = None,
) -> MimiCodec:
    """Load Mimi from any of:

    - a transformers Mimi directory (`config.json` + `model.safetensors`), or a transformers CSM directory whose
      codec weights sit under `codec_model.`;
    - a moshi-format `.safetensors` file (`encoder.model.0.conv.conv.weight`, ...); the architecture is the
      official one unless `config` (a MimiConfig, a `to_dict()` dict, or a transformers config dict) says otherwise;
    - a converted orbax directory written by `MimiCodec.save` / `python -m csm_jax.codec convert`;
    - a hub repo id `org/name[@revision]` holding one of these directories (e.g. `kyutai/mimi`; `csm_jax.hub`).

    `dtype` overrides the compute dtype ("float32" default, "bfloat16"); parameters stay float32.
    """
    path = hub.checkpoint_path(path, HUB_FILES)
    cfg = _config_arg(config)
    if path.is_dir() and checkpoint.is_converted(path):
        meta = checkpoint.read_meta(path, CHECKPOINT_KIND)
        cfg = cfg or MimiConfig.from_dict(meta["config"])
        params = checkpoint.restore(path, abstract_params(cfg))
    else:
        params, cfg = _load_safetensors(path, cfg)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return MimiCodec(params, cfg, num_codebooks)


def _load_safetensors(path: Path, cfg: MimiConfig | None) -> tuple[Any, MimiConfig]:
    prefix = ""
    if path.is_dir():
        weights, config_file = path / "model.safetensors", path / "config.json"
        if not weights.is_file():
            raise CheckpointError(f"{path} has no model.safetensors and no {checkpoint.META_FILE}")
        if cfg is None:
            try:
                hf = json.loads(config_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read {config_file}: {e}") from e
            if hf.get("model_type") == "csm":
                hf, prefix = hf.get("codec_config") or {}, "codec_model."
            try:
                cfg = MimiConfig.from_hf(hf)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{config_file}: {e}") from e
        elif _has_prefix(weights, "codec_model."):
            prefix = "codec_model."
        path = weights
    tensors = read_safetensors(path, prefix)
    fmt = detect_format(set(tensors))
    return convert_mimi(tensors, cfg or MimiConfig(), fmt, str(path)), cfg or MimiConfig()


def _has_prefix(path: Path, prefix: str) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return any(k.startswith(prefix) for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
