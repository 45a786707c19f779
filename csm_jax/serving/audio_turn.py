"""A user's audio turn arriving in chunks: audio processor -> streaming Mimi encoder -> codes.

PCM chunks (`pcm16` / `float32`, any rate and channel count) are resampled to 24 kHz as they arrive and every whole
80 ms frame is encoded at once by a streaming encoder, so `finish` only has the last partial frame left to do.
`file` turns (a whole wav/flac/ogg sent in chunks) are decoded at the end and go through the same streaming encoder,
so no audio length triggers a compilation.
"""

from __future__ import annotations

import numpy as np

from csm_jax.audio.processor import AudioError, AudioTooLong, PcmStream, load_audio
from csm_jax.codec.codec import MimiCodec

ENCODINGS = ("pcm16", "float32", "file")


class AudioTurn:
    """`push(bytes)` per chunk, then `finish() -> codes int32 [T, num_codebooks]`; `audio` is the turn at 24 kHz
    (float32 [N], for the transcriber). Raises AudioError on bad audio."""

    def __init__(self, codec: MimiCodec, num_codebooks: int, *, speaker: int, sample_rate: int,
                 encoding: str = "pcm16", channels: int = 1, transcript: str = "", max_seconds: float = 60.0):
        if encoding not in ENCODINGS:
            raise AudioError(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")
        self.codec, self.num_codebooks = codec, num_codebooks
        self.speaker, self.encoding, self.transcript, self.max_seconds = speaker, encoding, transcript, max_seconds
        self.frame = codec.frame_size
        self._file = bytearray()
        self._pcm = None if encoding == "file" else PcmStream(sample_rate=sample_rate, channels=channels,
                                                              encoding=encoding, max_seconds=max_seconds)
        self._encoder = codec.stream_encoder(1)
        self._buffer = np.zeros((0,), np.float32)
        self._audio: list[np.ndarray] = []
        self._codes: list[np.ndarray] = []
        # The byte budget of a max_seconds file at 96 kHz, stereo, 32-bit (a 45 s 96 kHz 24-bit stereo WAV fits);
        # the decoded length is checked against max_seconds from the header, before decoding.
        self.max_file_bytes = int(max_seconds * 96_000 * 2 * 4)

    def push(self, data: bytes) -> None:
        if self._pcm is None:
            if len(self._file) + len(data) > self.max_file_bytes:
                raise AudioTooLong(f"audio file is over {self.max_file_bytes} bytes (max_audio_s of 96 kHz stereo "
                                   "32-bit audio)")
            self._file.extend(data)
            return
        self._take(self._pcm.push(data))

    def finish(self) -> np.ndarray:
        if self._pcm is None:
            if not self._file:
                raise AudioError("audio turn is empty (no bytes received)")
            # Through the streaming encoder (compiled once), not an offline encode that compiles for every new
            # length and stalls every stream; the codes are the same (streaming == offline on whole frames).
            self._take(load_audio(bytes(self._file), max_seconds=self.max_seconds))
            self._buffer = np.pad(self._buffer, (0, -len(self._buffer) % self.frame))
            self._encode_whole_frames()
            return np.stack(self._codes).astype(np.int32)
        self._take(self._pcm.finish())
        if self._pcm.frames_in == 0:
            raise AudioError("audio turn is empty (no samples received)")
        if len(self._buffer) % self.frame:
            pad = self.frame - len(self._buffer) % self.frame
            self._buffer = np.concatenate([self._buffer, np.zeros((pad,), np.float32)])
        self._encode_whole_frames()
        if not self._codes:
            raise AudioError("audio turn is too short: it makes no sample at 24 kHz")
        return np.stack(self._codes).astype(np.int32)

    @property
    def audio(self) -> np.ndarray:
        """The samples received so far, float32 [N] at 24 kHz (before the frame padding)."""
        return np.concatenate(self._audio) if self._audio else np.zeros((0,), np.float32)

    def _take(self, samples: np.ndarray) -> None:
        self._audio.append(samples)
        self._buffer = np.concatenate([self._buffer, samples])
        self._encode_whole_frames()

    def _encode_whole_frames(self) -> None:
        n = len(self._buffer) // self.frame
        for i in range(n):
            codes = self._encoder.step(self._buffer[None, i * self.frame:(i + 1) * self.frame])
            self._codes.append(np.asarray(codes)[0, : self.num_codebooks])
        self._buffer = self._buffer[n * self.frame:]
