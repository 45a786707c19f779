"""Audio input: decode files or raw PCM to mono float32 at the codec rate (24 kHz).

Every entry point returns a float32 array of shape [N] with samples in [-1, 1]
(nominally; loudness-normalised audio is peak-limited to exactly <= 1) and raises
:class:`AudioError` with a descriptive message for any unusable input.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr

SAMPLE_RATE = 24_000

# encoding name -> (little-endian numpy dtype, full-scale value)
_PCM_ENCODINGS = {"pcm16": ("<i2", 32768.0), "float32": ("<f4", 1.0)}
_LOUDNESS_BLOCK_S = 0.4  # BS.1770 gating block used by pyloudnorm


class AudioError(ValueError):
    """Input audio is missing, undecodable, empty, non-finite, too long or mis-specified."""


class AudioTooLong(AudioError):
    """Input audio is longer than the caller's limit (``max_seconds``)."""


_DECODE_BLOCK = 1 << 16  # frames per decoded block


def load_audio(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
    *,
    sample_rate: int = SAMPLE_RATE,
    normalize_lufs: float | None = None,
    max_seconds: float | None = 600.0,
) -> np.ndarray:
    """Load an audio file (any format libsndfile reads: WAV, FLAC, OGG, MP3, ...).

    Args:
        source: a path, the file's bytes, or a seekable binary file object.
        sample_rate: output rate in Hz.
        normalize_lufs: if set, scale to this integrated loudness (ITU-R BS.1770) and
            peak-limit to <= 1; clips under 400 ms are measured looped to 400 ms and
            silence is returned unchanged.
        max_seconds: reject inputs longer than this (checked before decoding); None disables.

    Returns:
        float32 [N] mono samples at ``sample_rate`` (channels are averaged).
    """
    _check_positive(sample_rate, "sample_rate")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise AudioError(f"audio file not found: {os.fspath(source)!r}")
        name, stream = repr(os.fspath(source)), source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, stream = f"{len(source)} bytes", io.BytesIO(source)
    elif hasattr(source, "read"):
        name, stream = "file object", source
    else:
        raise AudioError(f"unsupported audio source type: {type(source).__name__}")

    try:
        with sf.SoundFile(stream) as f:
            _check_duration(f.frames, f.samplerate, max_seconds)
            rate = f.samplerate
            # Downmixed block by block into one mono buffer: memory follows the mono signal, not channels x samples
            # (a few hundred kilobytes of 8-channel 384 kHz FLAC silence would otherwise decode to most of a GB).
            mono = np.empty(max(f.frames, 0), np.float32)
            filled = 0
            for block in f.blocks(blocksize=_DECODE_BLOCK, dtype="float32", always_2d=True):
                if filled + len(block) > len(mono):  # a header that under-counts (e.g. some MP3s)
                    _check_duration(filled + len(block), rate, max_seconds)
                    mono = np.concatenate([mono, np.empty(max(len(block), len(mono) // 2), np.float32)])
                mono[filled:filled + len(block)] = block.mean(axis=1, dtype=np.float32)
                filled += len(block)
    except sf.SoundFileError as e:
        raise AudioError(f"cannot decode audio from {name}: {e}") from e
    return _finish(mono[:filled], rate, sample_rate, normalize_lufs)


def decode_pcm(
    data: bytes | bytearray | memoryview,
    *,
    sample_rate: int,
    channels: int = 1,
    encoding: str = "pcm16",
    target_rate: int = SAMPLE_RATE,
    normalize_lufs: float | None = None,
    max_seconds: float | None = 600.0,
) -> np.ndarray:
    """Decode headerless little-endian interleaved PCM.

    Args:
        data: raw bytes, frames of ``channels`` interleaved samples.
        sample_rate: rate of ``data`` in Hz.
        channels: number of interleaved channels.
        encoding: ``"pcm16"`` (int16, full scale 32768) or ``"float32"``.
        target_rate: output rate in Hz.
        normalize_lufs, max_seconds: as in :func:`load_audio`.

    Returns:
        float32 [N] mono samples at ``target_rate``.
    """
    _check_positive(sample_rate, "sample_rate")
    _check_positive(channels, "channels")
    _check_positive(target_rate, "target_rate")
    if encoding not in _PCM_ENCODINGS:
        raise AudioError(f"unknown PCM encoding {encoding!r}; expected one of {sorted(_PCM_ENCODINGS)}")
    dtype, full_scale = _PCM_ENCODINGS[encoding]
    frame_bytes = np.dtype(dtype).itemsize * channels
    if len(data) % frame_bytes:
        raise AudioError(
            f"PCM data is {len(data)} bytes, not a multiple of the {frame_bytes}-byte frame "
            f"({channels} channel(s) of {encoding})"
        )
    _check_duration(len(data) // frame_bytes, sample_rate, max_seconds)
    samples = np.frombuffer(data, dtype=dtype).reshape(-1, channels).astype(np.float32) / full_scale
    return _finish(samples, sample_rate, target_rate, normalize_lufs)


class PcmStream:
    """Incremental :func:`decode_pcm` for audio that arrives in chunks (a client streaming its microphone).

    ``push(bytes) -> float32 [n]`` mono at ``target_rate`` (soxr's streaming resampler, so chunk borders leave
    no seams); ``finish() -> float32 [n]`` flushes the resampler. Each chunk must hold whole frames of
    ``channels`` samples. Raises :class:`AudioError` on a malformed chunk or when the total passes ``max_seconds``.
    """

    def __init__(self, *, sample_rate: int, channels: int = 1, encoding: str = "pcm16",
                 target_rate: int = SAMPLE_RATE, max_seconds: float | None = 600.0):
        _check_positive(sample_rate, "sample_rate")
        _check_positive(channels, "channels")
        _check_positive(target_rate, "target_rate")
        if encoding not in _PCM_ENCODINGS:
            raise AudioError(f"unknown PCM encoding {encoding!r}; expected one of {sorted(_PCM_ENCODINGS)}")
        self.sample_rate, self.channels, self.encoding = sample_rate, channels, encoding
        self.max_seconds = max_seconds
        self.frames_in = 0
        self._resampler = (soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ")
                           if sample_rate != target_rate else None)

    @property
    def seconds(self) -> float:
        """Input duration pushed so far."""
        return self.frames_in / self.sample_rate

    def push(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        dtype, full_scale = _PCM_ENCODINGS[self.encoding]
        frame_bytes = np.dtype(dtype).itemsize * self.channels
        if len(data) % frame_bytes:
            raise AudioError(f"PCM chunk is {len(data)} bytes, not a multiple of the {frame_bytes}-byte frame "
                             f"({self.channels} channel(s) of {self.encoding})")
        _check_duration(self.frames_in + len(data) // frame_bytes, self.sample_rate, self.max_seconds)
        samples = np.frombuffer(data, dtype=dtype).reshape(-1, self.channels).astype(np.float32) / full_scale
        if not np.isfinite(samples).all():
            raise AudioError("audio contains non-finite samples (NaN or inf)")
        self.frames_in += len(samples)
        mono = samples.mean(axis=1, dtype=np.float32)
        return mono if self._resampler is None else self._resampler.resample_chunk(mono)

    def finish(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros((0,), np.float32)
        return self._resampler.resample_chunk(np.zeros((0,), np.float32), last=True)


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise AudioError(f"{name} must be a positive integer, got {value!r}")


def _check_duration(frames: int, rate: int, max_seconds: float | None) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        raise AudioTooLong(f"audio is {frames / rate:.2f} s long, over the {max_seconds:g} s limit (max_seconds)")


def _finish(samples: np.ndarray, rate: int, target_rate: int, normalize_lufs: float | None) -> np.ndarray:
    """[N, C] (or already mono [N]) float32 at ``rate`` -> [N'] float32 mono at ``target_rate``, optionally
    normalised."""
    if samples.shape[0] == 0:
        raise AudioError("audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError("audio contains non-finite samples (NaN or inf)")
    mono = samples if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    if normalize_lufs is not None:
        mono = _normalize(mono, target_rate, normalize_lufs)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _normalize(mono: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (ITU-R BS.1770), then peak-limit to <= 1.

    Clips shorter than the 400 ms measurement block are measured on the clip repeated
    to that length, i.e. their K-weighted mean loudness. Silent audio (loudness -inf)
    is returned unchanged. If the gain would push the peak above 1, the whole clip is
    scaled down so the peak is exactly 1 (quieter than the target).
    """
    block = math.ceil(_LOUDNESS_BLOCK_S * rate)
    measured = mono if len(mono) >= block else np.tile(mono, math.ceil(block / len(mono)))
    loudness = pyloudnorm.Meter(rate).integrated_loudness(measured.astype(np.float64))
    if not np.isfinite(loudness):
        return mono
    out = mono * np.float32(10.0 ** ((target_lufs - loudness) / 20.0))
    peak = float(np.max(np.abs(out)))
    return out / peak if peak > 1.0 else out
