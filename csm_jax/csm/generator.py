"""User-facing CSM generation: prompts from text and context segments, codes, and streamed audio.

    gen = csm_jax.load_csm(path)
    audio = gen.generate("Hello there.", speaker=0, context=[Segment(1, "Hi!", hi_audio)], seed=0)
    for chunk in gen.stream("Hello there.", speaker=0):   # float32 [1920] per 80 ms frame, first after one frame
        ...
    codes = gen.generate_codes(tokens, mask, max_frames=50, temperature=0.9, top_k=50, seed=0)

A model's voice presets (`voices.json`, `csm_jax.csm.voices`) prompt a speaker whose audio is not in the context:
`voice="default"` (the default) uses the model's default preset if it has one, `voice=None` none.

Sampling settings left out (None) come from `gen.sampling`: the model directory's `generation_config.json`, or the
CSM reference's 0.9 / top 50. A `temperature` or `top_k` given without `depth_temperature` / `depth_top_k` applies to
every codebook (`Sampling.override`).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from csm_jax import backend as backend_policy
from csm_jax import hub, sharding
from csm_jax.backend import PolicyOverrides
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.codec import MimiCodec, load_codec
from csm_jax.csm import quantize as csm_quantize
from csm_jax.csm.config import CsmConfig
from csm_jax.csm.engine import Engine
from csm_jax.csm.frontend import TextFrontend
from csm_jax.csm.prompt import PromptFormat, Rows, code_rows, concat, read_prompt_settings, voice_applies
from csm_jax.csm.sampling import Sampling, read_sampling
from csm_jax.csm.voices import DEFAULT_VOICE, VoicePreset, read_voices, resolve
from csm_jax.csm.weights import HUB_FILES, load_csm_params

FRAME_MS = 80


@dataclasses.dataclass(frozen=True)
class Segment:
    """One conversation turn: speaker id, its transcript, and optionally its audio (float32 [N] at 24 kHz)."""

    speaker: int
    text: str
    audio: np.ndarray | None = None


class Generator:
    """CSM + Mimi: text and context -> codes -> audio. Compiled engines are cached per batch size. `sampling`:
    the default sampling settings (`csm_jax.csm.sampling.Sampling`); `voices`: the voice presets by name."""

    def __init__(self, params: Any, cfg: CsmConfig, codec: MimiCodec | None = None,
                 tokenizer: Tokenizer | None = None, num_codebooks: int | None = None, mesh: Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES, frontend: str | TextFrontend | None = None,
                 max_context_turns: int = 16, sampling: Sampling | None = None,
                 voices: Mapping[str, VoicePreset] | None = None):
        self.cfg, self.codec, self.tokenizer = cfg, codec, tokenizer
        self.voices = dict(voices or {})
        self._voice_codes: dict[str, list[np.ndarray]] = {}
        self.sampling = Sampling() if sampling is None else sampling  # the defaults of every generate call
        self.format = None if tokenizer is None else PromptFormat(tokenizer, cfg.num_codebooks, cfg.audio_vocab_size,
                                                                   frontend, max_context_turns)
        self.mesh, self.rules = mesh, rules
        self.params = params if mesh is not None else jax.device_put(params)  # one device copy for all engines
        self.num_codebooks = cfg.num_codebooks if num_codebooks is None else num_codebooks
        self._engines: dict[int, Engine] = {}
        if codec is not None and codec.config.num_quantizers < cfg.num_codebooks:
            raise ValueError(f"codec has {codec.config.num_quantizers} codebooks, CSM needs {cfg.num_codebooks}")

    def engine(self, batch_size: int) -> Engine:
        if batch_size not in self._engines:
            self._engines[batch_size] = Engine(self.params, self.cfg, batch_size, self.num_codebooks, self.mesh,
                                               self.rules)
        return self._engines[batch_size]

    # prompts ---------------------------------------------------------------------------------------------
    def prompt_format(self) -> PromptFormat:
        """The model's conversation format (tokenizer, text front end, codebooks)."""
        if self.format is None:
            raise ValueError("this checkpoint has no tokenizer.json; use generate_codes with token ids instead")
        return self.format

    def text_rows(self, text: str, speaker: int) -> Rows:
        """`[speaker]text` with BOS/EOS -> tokens int32 [S, K+1] (text in column K), mask bool [S, K+1]."""
        return self.prompt_format().text_rows(text, speaker)

    def audio_rows(self, audio: np.ndarray) -> Rows:
        """Mono 24 kHz audio -> its Mimi codes plus one all-zero EOS frame, as audio rows."""
        return self.code_rows(self.audio_codes(audio))

    def audio_codes(self, audio: np.ndarray) -> np.ndarray:
        """Mono 24 kHz audio float [N] -> its Mimi codes int32 [T, K] (offline `encode`, as transformers' CSM).
        Whole-frame lengths are encoded on a length bucket (`encode_bucketed`, the same
        codes) so they share compilations; a partial last frame makes offline Mimi pad its activations in a
        length-specific way, so those lengths compile their own encode."""
        if self.codec is None:
            raise ValueError("no codec loaded: audio context needs the Mimi weights")
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"segment audio must be mono float [N], got shape {list(audio.shape)}")
        whole = audio.shape[0] % self.codec.frame_size == 0
        codes = (self.codec.encode_bucketed if whole else self.codec.encode)(audio[None])
        return np.asarray(codes, np.int32)[0, : self.cfg.num_codebooks].T

    def voice(self, name: str | None = DEFAULT_VOICE) -> list[tuple[str, np.ndarray]]:
        """Voice preset `name`'s turns (`csm_jax.csm.voices.resolve`; None, or "default" on a model without one:
        no turns) as (transcript, codes int32 [T, K]), oldest first; the codes are encoded once and cached."""
        preset = resolve(self.voices, name)
        if preset is None:
            return []
        if preset.name not in self._voice_codes:
            self._voice_codes[preset.name] = [self.audio_codes(audio) for _, audio in preset.turns]
        return [(text, codes) for (text, _), codes in zip(preset.turns, self._voice_codes[preset.name])]

    def code_rows(self, codes: np.ndarray) -> Rows:
        """Audio codes int [T, K'] (K' <= K) plus one all-zero end frame -> audio rows [T+1, K+1]."""
        return code_rows(codes, self.cfg.num_codebooks, self.cfg.audio_vocab_size)

    def prompt(self, text: str, speaker: int, context: Sequence[Segment] = (),
               voice: str | None = DEFAULT_VOICE) -> tuple[np.ndarray, np.ndarray]:
        """Context segments (each its text rows, then its audio rows) followed by the target text rows; voice
        preset `voice` first, spoken as `speaker`, when no segment is audio of `speaker` (`voice_applies`)."""
        fmt = self.prompt_format()
        parts = []
        for seg in context:
            if not isinstance(seg, Segment):
                raise TypeError(f"context items must be csm_jax.Segment, got {type(seg).__name__}")
        preset = self.voice(voice)  # a bad name is an error whether or not the preset applies
        if voice_applies([(s.speaker, s.audio is not None) for s in context], speaker):
            for preset_text, codes in preset:
                parts += [fmt.text_rows(preset_text, speaker), self.code_rows(codes)]
        for seg in context:
            parts.append(fmt.text_rows(seg.text, seg.speaker))
            if seg.audio is not None:
                parts.append(self.audio_rows(seg.audio))
        parts.append(fmt.text_rows(text, speaker))
        return concat(parts)

    # codes ---------------------------------------------------------------------------------------------
    def resolve_sampling(self, temperature: float | None = None, top_k: int | None = None,
                         depth_temperature: float | None = None, depth_top_k: int | None = None) -> Sampling:
        """`self.sampling` with the given settings in place (`Sampling.override`), checked against the vocab."""
        s = self.sampling.override(temperature, top_k, depth_temperature, depth_top_k)
        for name in ("top_k", "depth_top_k"):
            if getattr(s, name) > self.cfg.audio_vocab_size:
                raise ValueError(f"{name} must be an int in 1..{self.cfg.audio_vocab_size}, got {getattr(s, name)!r}")
        return s

    def _check(self, tokens: Any, mask: Any, max_frames: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        cfg = self.cfg
        k = cfg.num_codebooks
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if tokens.ndim not in (2, 3) or tokens.shape[-1] != k + 1 or mask.shape != tokens.shape:
            raise ValueError(f"tokens and mask must both be [S, {k + 1}] or [B, S, {k + 1}], "
                             f"got {list(tokens.shape)} and {list(mask.shape)}")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int | np.integer) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
        batch = (tokens[None], mask[None]) if tokens.ndim == 2 else (tokens, mask)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= 2**32 - len(batch[0]):
            raise ValueError(f"seed must be an int in [0, 2**32 - batch size], got {seed!r}")
        prompts = []
        for t, m in zip(*batch):
            rows = np.flatnonzero(m.any(axis=-1))
            if rows.size == 0:
                raise ValueError("prompt is empty (no unmasked row)")
            t, m = t[: rows[-1] + 1], m[: rows[-1] + 1]
            audio_bad = m[:, :k] & ((t[:, :k] < 0) | (t[:, :k] >= cfg.audio_vocab_size))
            text_bad = m[:, k] & ((t[:, k] < 0) | (t[:, k] >= cfg.text_vocab_size))
            if audio_bad.any() or text_bad.any():
                raise ValueError(f"tokens out of range: audio codes must be in [0, {cfg.audio_vocab_size}), "
                                 f"text ids in [0, {cfg.text_vocab_size})")
            if len(t) + max_frames > self.engine_max_len:
                raise ValueError(f"prompt of {len(t)} rows + {max_frames} frames exceeds the "
                                 f"{self.engine_max_len}-position context")
            prompts.append((t.astype(np.int32), m))
        return prompts

    @property
    def engine_max_len(self) -> int:
        return self.cfg.backbone.max_seq_len

    def _frames(self, prompts: list[tuple[np.ndarray, np.ndarray]], max_frames: int, sampling: Sampling,
                seed: int, code_limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (codes int32 [B, K'], live bool [B]) per frame; a row stops at its first all-zero frame."""
        b = len(prompts)
        eng = self.engine(b)
        limit = [code_limit or self.cfg.audio_vocab_size] * b
        state = eng.prefill(eng.init_state(), list(range(b)), prompts, seeds=[seed + i for i in range(b)],
                            temperature=[sampling.temperature] * b, top_k=[sampling.top_k] * b, code_limit=limit,
                            depth_temperature=[sampling.depth_temperature] * b, depth_top_k=[sampling.depth_top_k] * b)
        live = np.ones(b, bool)
        for _ in range(max_frames):
            state, codes = eng.step(state)
            codes = np.asarray(codes)
            live &= codes.any(axis=-1)
            if not live.any():
                return
            yield codes, live.copy()

    def generate_codes(self, tokens: Any, mask: Any, max_frames: int, temperature: float | None = None,
                       top_k: int | None = None, seed: int = 0, code_limit: int | None = None, *,
                       depth_temperature: float | None = None, depth_top_k: int | None = None
                       ) -> np.ndarray | list[np.ndarray]:
        """tokens int [S, K+1], mask bool [S, K+1] (column K is text) -> int32 codes [T, K'] (K' = num_codebooks),
        stopping at the all-zero frame (not kept) or after max_frames. Batched [B, S, K+1] (trailing all-masked
        rows are padding) -> a list of B arrays; row i samples with seed + i. `code_limit` restricts sampled codes
        to [0, code_limit) (the audio APIs use the codec's codebook size; default: the whole audio vocab)."""
        sampling = self.resolve_sampling(temperature, top_k, depth_temperature, depth_top_k)
        prompts = self._check(tokens, mask, max_frames, seed)
        vocab = self.cfg.audio_vocab_size
        if code_limit is not None and not (isinstance(code_limit, int) and 1 <= code_limit <= vocab):
            raise ValueError(f"code_limit must be an int in 1..{vocab}, got {code_limit!r}")
        out: list[list[np.ndarray]] = [[] for _ in prompts]
        for codes, live in self._frames(prompts, max_frames, sampling, seed, code_limit):
            for i in np.flatnonzero(live):
                out[i].append(codes[i])
        stacked = [np.stack(o) if o else np.zeros((0, self.num_codebooks), np.int32) for o in out]
        return stacked[0] if np.asarray(tokens).ndim == 2 else stacked

    # audio ---------------------------------------------------------------------------------------------
    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), max_audio_ms: int = 10_000,
               temperature: float | None = None, top_k: int | None = None, seed: int = 0, *,
               depth_temperature: float | None = None, depth_top_k: int | None = None,
               voice: str | None = DEFAULT_VOICE) -> Iterator[np.ndarray]:
        """Float32 audio chunks [1920] at 24 kHz, one per generated frame, decoded by the streaming codec.
        Inputs are validated (and the prompt encoded) before this returns, so errors surface at the call."""
        if self.codec is None:
            raise ValueError("no codec loaded: audio output needs the Mimi weights")
        tokens, mask = self.prompt(text, speaker, context, voice)
        sampling = self.resolve_sampling(temperature, top_k, depth_temperature, depth_top_k)
        max_frames = max(1, int(max_audio_ms) // FRAME_MS)
        prompts = self._check(tokens, mask, max_frames, seed)
        decoder = self.codec.stream_decoder(1)
        limit = self.codec.config.codebook_size  # CSM's vocab has special ids past the codec's range
        frames = self._frames(prompts, max_frames, sampling, seed, limit)
        return (np.asarray(decoder.step(codes))[0] for codes, _ in frames)

    def generate(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), max_audio_ms: int = 10_000,
                 temperature: float | None = None, top_k: int | None = None, seed: int = 0, *,
                 depth_temperature: float | None = None, depth_top_k: int | None = None,
                 voice: str | None = DEFAULT_VOICE) -> np.ndarray:
        """float32 [N] at 24 kHz (N = 1920 * frames)."""
        chunks = list(self.stream(text, speaker, context, max_audio_ms, temperature, top_k, seed,
                                  depth_temperature=depth_temperature, depth_top_k=depth_top_k, voice=voice))
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


def load_csm(path: str | Path, *, codec: MimiCodec | str | Path | None = None, num_codebooks: int | None = None,
             dtype: str | None = None, mesh: Mesh | None = None,
             rules: sharding.Rules = sharding.DEFAULT_RULES, quantize: str | None = None,
             backend: Mapping[str, Any] | PolicyOverrides | None = None) -> Generator:
    """A Generator from a transformers CSM dir (with `tokenizer.json`, `prompt.json`, `generation_config.json`,
    `voices.json` and `codec_model.*` when present), an original Sesame checkpoint, or a converted dir, each local or a
    hub repo id `org/name[@revision]` (e.g. "sesame/csm-1b"; see `csm_jax.hub`). `codec` (a MimiCodec, or
    anything `load_codec` reads, hub ids included) overrides where Mimi comes from.
    `dtype`: the compute dtype (float32, bfloat16); parameters are stored in it (cast once here).
    `quantize`: weight-only "int8" or "bf16" projections and audio heads (`csm_jax.csm.quantize`), computing in `dtype`
    (default: the backend policy's `quantized_compute_dtype`); a checkpoint converted with `--quantize` keeps its
    mode and is not quantised again.
    `backend`: backend policy overrides (`csm_jax.backend.configure`, process-wide; None values keep the
    backend's defaults); None leaves the policy as it is."""
    if quantize is not None and quantize not in csm_quantize.MODES:
        raise ValueError(f"unknown quantize {quantize!r}; supported: {list(csm_quantize.MODES)}")
    if backend is not None:
        backend_policy.configure(backend)
    path = hub.checkpoint_path(path, HUB_FILES)
    params, cfg = load_csm_params(path)
    stored = csm_quantize.quantization(params)
    if quantize is not None or stored is not None:
        params, cfg = csm_quantize.quantize_params(params, cfg, quantize or stored,
                                                   dtype or (cfg.dtype if stored else None))
    elif dtype is not None:
        cfg = cfg.replace(dtype=dtype)
        params = csm_quantize.cast_params(params, cfg.compute_dtype)
    root = path if path.is_dir() else path.parent
    tokenizer = None
    if (root / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read {root / 'tokenizer.json'}: {e}") from e
    if isinstance(codec, str | Path):
        codec = load_codec(codec)
    elif codec is None and (path / "codec").is_dir():  # converted checkpoint (`python -m csm_jax.csm convert`)
        codec = load_codec(path / "codec")
    elif codec is None and path.is_dir() and (path / "config.json").is_file():
        try:
            codec = load_codec(path)
        except CheckpointError:
            codec = None  # no codec_model weights in this checkpoint
        if codec is not None and codec.config.num_quantizers < cfg.num_codebooks:
            warnings.warn(f"{path}: bundled codec has {codec.config.num_quantizers} codebooks, CSM needs "
                          f"{cfg.num_codebooks}; audio APIs are disabled (pass codec=...)", stacklevel=2)
            codec = None
    try:
        prompt, sampling, voices = read_prompt_settings(root), read_sampling(root), read_voices(root)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return Generator(params, cfg, codec, tokenizer, num_codebooks, mesh, rules, **prompt, sampling=sampling,
                     voices=voices)
