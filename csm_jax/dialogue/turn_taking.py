"""Turn-taking: a streaming voice-activity endpointer over the incoming user audio (webrtcvad).

`SpeechDetector.push(audio, sample_rate)` takes float32 mono chunks of any length at any sample rate, resamples them
to 16 kHz with a streaming soxr resampler, cuts PCM16 frames of `frame_ms` for webrtcvad and runs a small state
machine over the per-frame voiced/unvoiced flags:

* webrtcvad keeps flagging frames as speech for a fixed "hangover" after each burst of speech (`WEBRTC_HANGOVER`,
  the constants of webrtc's vad_core.c: after more than six speech frames 140-150 ms in modes 0-1 and 90-100 ms in
  modes 2-3, by frame length; less after shorter bursts). Each voiced run is counted without its hangover, so
  `min_speech_ms` and the end of speech are those of the audio, not of the VAD's hangover (on tests/data the reported
  start and end are within 20 ms of the energy envelope's).
* speech starts once `min_speech_ms` of voiced frames have gathered in a candidate stretch (gaps inside it of under
  `BRIDGE_MS` are bridged; a longer gap drops the candidate, so isolated blips are not speech). `speech_started`
  reports where the candidate's first voiced frame began.
* in speech, voiced frames that follow the last speech within `BRIDGE_MS` extend it directly; after a longer gap,
  speech only resumes once a new candidate is confirmed (`min_speech_ms` again), so a cough or a click in the
  trailing silence does not hold the turn open. After `end_silence_ms` with no (confirmed) speech since the end of
  speech, `speech_stopped` reports where it ended.

Everything is synchronous, deterministic and single-threaded. The events do not depend on how the audio is chunked:
soxr's streaming resampler gives bit-identical output for any chunking (tests/test_turn_taking.py checks this), and
the rest works on whole frames.

Times are milliseconds of audio from the start of the stream (or the last `reset()`), measured on the 16 kHz frame
grid, so they are multiples of `frame_ms`. Detection lags the audio by the frame being filled plus the resampler's
buffering (about 11 ms on average and 25 ms at most for 22-48 kHz input, twice that for 8 kHz, none at 16 kHz);
`Event.detected_ms` says how much audio had been processed when an event fired.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

VAD_RATE = 16_000  # webrtcvad works at 8/16/32/48 kHz; 16 kHz keeps its whole analysis band (up to 4 kHz)
FRAME_MS = (10, 20, 30)  # the frame lengths webrtcvad accepts
BRIDGE_MS = 150  # gaps in the VAD flags shorter than this (capped by end_silence_ms) never split speech or a candidate
# webrtcvad's hangover in frames (webrtc/common_audio/vad/vad_core.c), by frame length, then mode 0..3: after a burst
# of at most six speech frames (kOverHangMax1*) and after a longer one (kOverHangMax2*).
WEBRTC_HANGOVER = {
    10: ((8, 8, 6, 6), (14, 14, 9, 9)),
    20: ((4, 4, 3, 3), (7, 7, 5, 5)),
    30: ((3, 3, 2, 2), (5, 5, 3, 3)),
}
WEBRTC_MAX_SPEECH_FRAMES = 6  # kMaxSpeechFrames: bursts longer than this get the long hangover


@dataclasses.dataclass(frozen=True)
class TurnTakingConfig:
    """How the server decides that the user's turn is over and whether the user may interrupt a response.

    vad: off (the default) keeps protocol-1 behaviour: the client says when its turn ends. On: the server ends the
        user's turn after `end_silence_ms` of silence following speech.
    aggressiveness: webrtcvad mode, 0 (flags most as speech) .. 3 (strictest; best in noise).
    end_silence_ms: silence after speech that ends the turn.
    min_speech_ms: voiced audio needed before it counts as speech (shorter blips are ignored).
    barge_in: user speech during a response cancels that response.
    frame_ms: webrtcvad frame length: 10, 20 or 30.
    """

    vad: bool = False
    aggressiveness: int = 2
    end_silence_ms: int = 700
    min_speech_ms: int = 200
    barge_in: bool = True
    frame_ms: int = 30

    def __post_init__(self):
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"turn_taking.aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness!r}")
        if self.frame_ms not in FRAME_MS:
            raise ValueError(f"turn_taking.frame_ms must be one of {list(FRAME_MS)}, got {self.frame_ms!r}")
        if not 0 < self.end_silence_ms <= 60_000:
            raise ValueError(f"turn_taking.end_silence_ms must be in (0, 60000], got {self.end_silence_ms!r}")
        if not 0 <= self.min_speech_ms <= 10_000:
            raise ValueError(f"turn_taking.min_speech_ms must be in [0, 10000], got {self.min_speech_ms!r}")


@dataclasses.dataclass(frozen=True)
class Event:
    """kind: "speech_started" or "speech_stopped".
    offset_ms: where speech began (started) or ended (stopped), ms from the start of the stream.
    detected_ms: how much audio (ms) had been processed when the event fired; detected_ms - offset_ms is the
        decision delay (at least min_speech_ms for a start, end_silence_ms for a stop)."""

    kind: Literal["speech_started", "speech_stopped"]
    offset_ms: int
    detected_ms: int


class SpeechDetector:
    """Streaming endpointer: `push(audio, sample_rate) -> list[Event]`, `reset()`.

    `vad` can be replaced by any object with `is_speech(frame: bytes, sample_rate: int) -> bool` (tests); by default
    it is a `webrtcvad.Vad(config.aggressiveness)`, whose hangover (`hangover_frames`: after short, long bursts)
    is not counted as speech; a replaced vad is taken to have none.
    """

    def __init__(self, config: TurnTakingConfig | None = None, *, vad=None):
        self.config = config or TurnTakingConfig()
        self._vad_arg = vad
        self.frame_len = VAD_RATE * self.config.frame_ms // 1000  # samples per VAD frame at 16 kHz
        self.min_frames = max(1, -(-self.config.min_speech_ms // self.config.frame_ms))  # ceil
        self.bridge_frames = max(1, min(BRIDGE_MS, self.config.end_silence_ms) // self.config.frame_ms)
        self.end_frames = max(1, -(-self.config.end_silence_ms // self.config.frame_ms))
        table = WEBRTC_HANGOVER[self.config.frame_ms]
        mode = self.config.aggressiveness
        self.hangover_frames = (0, 0) if vad is not None else (table[0][mode], table[1][mode])
        self.reset()

    def reset(self) -> None:
        """Forget all audio and state (a new stream starts at offset 0; a new sample rate may be used)."""
        if self._vad_arg is None:
            import webrtcvad

            self._vad = webrtcvad.Vad(self.config.aggressiveness)
        else:
            self._vad = self._vad_arg
        self._rate: int | None = None
        self._resampler = None
        self._pending = np.zeros((0,), np.int16)  # 16 kHz PCM16 samples not yet filling a frame
        self._frames = 0  # frames analysed so far
        self._in_speech = False
        self._speech_end = 0  # in speech: frame index just past the last voiced frame of confirmed speech ...
        self._speech_run = 0  # ... and the first frame of the voiced run it ends
        self._run_start = 0  # first frame of the current (or last) run of voiced frames
        self._prev_voiced = False
        self._cand_start: int | None = None  # first frame of the current speech candidate (always a run start)
        self._cand_done = 0  # speech frames (hangover excluded) in the candidate's finished runs
        self._cand_last = 0  # frame index just past the candidate's last voiced frame

    @property
    def in_speech(self) -> bool:
        """True between a `speech_started` and the following `speech_stopped`."""
        return self._in_speech

    @property
    def processed_ms(self) -> int:
        """Audio analysed so far, in ms (whole frames only)."""
        return self._frames * self.config.frame_ms

    def push(self, audio: np.ndarray, sample_rate: int) -> list[Event]:
        """Feed the next chunk of the stream and return the events it completes, in order.

        audio: float mono samples in [-1, 1], shape [N] (N >= 0, any length; float32 preferred, other float
            dtypes are converted; non-finite values are treated as 0, values outside [-1, 1] are clipped).
        sample_rate: Hz, the same for every chunk until `reset()`.
        Raises ValueError on a multi-channel array, a non-positive or changed sample rate.
        """
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono, shape [N]; got shape {audio.shape}")
        if not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"audio must be float samples in [-1, 1]; got dtype {audio.dtype}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        sample_rate = int(sample_rate)
        if self._rate is None:
            self._rate = sample_rate
            if sample_rate != VAD_RATE:
                import soxr

                # LQ: VAD only looks below 4 kHz, and LQ buffers about half as much audio as HQ (lower latency).
                self._resampler = soxr.ResampleStream(sample_rate, VAD_RATE, 1, dtype="float32", quality="LQ")
        elif sample_rate != self._rate:
            raise ValueError(f"sample_rate changed from {self._rate} to {sample_rate} within a stream; reset() first")
        if audio.size == 0:
            return []
        x = np.nan_to_num(audio.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        pcm = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
        pcm = np.concatenate([self._pending, pcm])
        n = len(pcm) // self.frame_len
        self._pending = pcm[n * self.frame_len:]
        events: list[Event] = []
        for i in range(n):
            frame = pcm[i * self.frame_len:(i + 1) * self.frame_len]
            self._step(bool(self._vad.is_speech(frame.tobytes(), VAD_RATE)), events)
        return events

    def _hangover(self, run: int) -> int:
        """Hangover frames at the end of a finished voiced run of `run` frames (its first frame is always speech)."""
        short, long = self.hangover_frames
        return min(long if run - long > WEBRTC_MAX_SPEECH_FRAMES else short, run - 1)

    def _speech_so_far(self, run: int) -> int:
        """A lower bound on the speech frames in a voiced run still going on after `run` frames (its tail may be
        hangover: the short one while the burst could still be short, the long one after that)."""
        short, long = self.hangover_frames
        if run - short <= WEBRTC_MAX_SPEECH_FRAMES:
            return max(1, run - short)
        return max(WEBRTC_MAX_SPEECH_FRAMES + 1, run - long)

    def _step(self, voiced: bool, events: list[Event]) -> None:
        """Advance the state machine by one frame (index self._frames) with its VAD flag."""
        i, ms = self._frames, self.config.frame_ms
        self._frames += 1
        if voiced and not self._prev_voiced:
            self._run_start = i
        elif not voiced and self._prev_voiced and self._cand_start is not None:
            run = i - self._run_start  # a run of the candidate has ended
            self._cand_done += run - self._hangover(run)
        self._prev_voiced = voiced
        if voiced and self._in_speech and i - self._speech_end < self.bridge_frames:
            self._extend_speech(i)  # a short gap inside speech: bridged
        elif voiced:
            if self._cand_start is None or i - self._cand_last >= self.bridge_frames:
                self._cand_start, self._cand_done = i, 0  # a new candidate (the old one, if any, had a long gap)
            self._cand_last = i + 1
            if self._cand_done + self._speech_so_far(i + 1 - self._run_start) >= self.min_frames:
                if not self._in_speech:
                    self._in_speech = True
                    events.append(Event("speech_started", self._cand_start * ms, self._frames * ms))
                self._extend_speech(i)  # confirmed: speech resumes (or starts)
        if self._in_speech:
            run = self._speech_end - self._speech_run
            end = self._speech_end - self._hangover(run)  # the end of speech without the VAD's hangover
            if self._frames - end >= self.end_frames:
                self._in_speech = False
                events.append(Event("speech_stopped", end * ms, self._frames * ms))

    def _extend_speech(self, i: int) -> None:
        self._speech_end, self._speech_run = i + 1, self._run_start
        self._cand_start = None
