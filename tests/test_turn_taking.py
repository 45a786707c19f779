"""SpeechDetector (webrtcvad endpointer) on the real speech clips in tests/data.

Reference times come from each clip's energy envelope: 10 ms RMS blocks within 40 dB of the loudest block. The
detector reports times on its frame grid (30 ms) and takes webrtcvad's hangover back from the end of speech; on
these clips its start and end are within 20 ms of the envelope's. The tolerance asserted is 60 ms: two frames of
grid quantisation (one each side of the 10 ms envelope block), well inside the ~150 ms a turn end may be off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from csm_jax.dialogue.turn_taking import Event, SpeechDetector, TurnTakingConfig

DATA = Path(__file__).parent / "data"
TOL_MS = 60
CFG = TurnTakingConfig(vad=True)  # aggressiveness 2, end_silence_ms 700, min_speech_ms 200, frame_ms 30


def load(name: str) -> tuple[np.ndarray, int]:
    x, sr = sf.read(DATA / name, dtype="float32")
    return (x.mean(axis=1) if x.ndim == 2 else x).astype(np.float32), sr


def envelope_bounds(x: np.ndarray, sr: int) -> tuple[int, int]:
    """(start_ms, end_ms) of the audio within 40 dB of its loudest 10 ms block."""
    h = sr // 100
    n = len(x) // h
    rms = np.sqrt(np.mean(x[: n * h].reshape(n, h) ** 2, axis=1))
    db = 20 * np.log10(rms + 1e-9)
    active = np.flatnonzero(db > db.max() - 40)
    return int(active[0]) * 10, int(active[-1] + 1) * 10


def silence(sr: int, seconds: float, noise_dbfs: float | None = None, seed: int = 0) -> np.ndarray:
    n = int(sr * seconds)
    if noise_dbfs is None:
        return np.zeros(n, np.float32)
    return (np.random.default_rng(seed).standard_normal(n) * 10 ** (noise_dbfs / 20)).astype(np.float32)


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def push_chunked(det: SpeechDetector, x: np.ndarray, sr: int, sizes) -> list[Event]:
    events, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        events += det.push(x[i:i + n], sr)
        i, k = i + n, k + 1
    return events


@pytest.mark.parametrize("name", ["speech_1s.wav", "speech_3s.wav"])
@pytest.mark.parametrize("noise_dbfs", [None, -50.0])
def test_speech_then_silence_gives_one_turn_at_the_right_times(name, noise_dbfs):
    speech, sr = load(name)
    x = np.concatenate([speech, silence(sr, 1.0)])
    if noise_dbfs is not None:  # a room-level noise floor under everything
        x = x + silence(sr, len(x) / sr, noise_dbfs, seed=1)[: len(x)]
    start_ms, end_ms = envelope_bounds(speech, sr)
    events = SpeechDetector(CFG).push(x, sr)
    assert kinds(events) == ["speech_started", "speech_stopped"], events
    started, stopped = events
    assert abs(started.offset_ms - start_ms) <= TOL_MS, (started, start_ms)
    assert abs(stopped.offset_ms - end_ms) <= TOL_MS, (stopped, end_ms)
    # Decisions: a start once min_speech_ms of speech is in (the VAD's hangover not counted, gaps not counted), a
    # stop end_silence_ms (on the frame grid) after the end of speech.
    assert 210 <= started.detected_ms - started.offset_ms <= 330  # ceil(200 / 30) frames + up to 2 frames of hangover
    assert stopped.detected_ms - stopped.offset_ms == 720  # ceil(700 / 30) frames
    assert stopped.detected_ms <= len(x) * 1000 / sr


@pytest.mark.parametrize("rate", [44_100, 48_000, 16_000, 8_000])
def test_other_sample_rates_give_the_same_turn(rate):
    speech, sr = load("speech_3s.wav")
    x = np.concatenate([speech, silence(sr, 1.0)])
    ref = SpeechDetector(CFG).push(x, sr)
    y = soxr.resample(x, sr, rate).astype(np.float32)
    events = SpeechDetector(CFG).push(y, rate)
    assert kinds(events) == ["speech_started", "speech_stopped"]
    for a, b in zip(events, ref):
        assert abs(a.offset_ms - b.offset_ms) <= 30, (events, ref)


def test_stereo_44k_clip_downmixed():
    speech, sr = load("speech_stereo_44k.wav")
    assert sr == 44_100
    start_ms, end_ms = envelope_bounds(speech, sr)
    events = SpeechDetector(CFG).push(np.concatenate([speech, silence(sr, 1.0)]), sr)
    assert kinds(events) == ["speech_started", "speech_stopped"]
    assert abs(events[0].offset_ms - start_ms) <= TOL_MS and abs(events[1].offset_ms - end_ms) <= TOL_MS, events


@pytest.mark.parametrize("noise_dbfs", [None, -60.0, -40.0])
def test_silence_only_gives_no_events(noise_dbfs):
    det = SpeechDetector(CFG)
    assert det.push(silence(24_000, 3.0, noise_dbfs), 24_000) == []
    assert not det.in_speech and 3000 - 60 <= det.processed_ms <= 3000  # less what the resampler holds back


def test_white_noise_depends_on_aggressiveness():
    """Steady white noise at -30 dBFS (5 s). webrtcvad judges frames by spectral shape against a noise model that
    adapts: in its least aggressive mode (0) it takes such noise for speech off and on; in modes 2 and 3 (2 is the
    default) it does not. Much louder noise (-20 dBFS) is speech to every mode: the VAD is no noise classifier."""
    noise = silence(24_000, 5.0, -30.0, seed=0)
    for aggressiveness in (2, 3):
        assert SpeechDetector(TurnTakingConfig(vad=True, aggressiveness=aggressiveness)).push(noise, 24_000) == []
    events = SpeechDetector(TurnTakingConfig(vad=True, aggressiveness=0)).push(noise, 24_000)
    assert events and events[0].kind == "speech_started"
    loud = silence(24_000, 2.0, -20.0, seed=0)
    assert kinds(SpeechDetector(TurnTakingConfig(vad=True, aggressiveness=3)).push(loud, 24_000)) == [
        "speech_started"]


def test_speech_in_moderate_noise_still_ends_the_turn():
    speech, sr = load("speech_3s.wav")
    x = np.concatenate([silence(sr, 0.5), speech, silence(sr, 1.0)])
    x = x + silence(sr, len(x) / sr, -30.0, seed=2)[: len(x)]
    start_ms, end_ms = envelope_bounds(speech, sr)
    events = SpeechDetector(TurnTakingConfig(vad=True, aggressiveness=3)).push(x, sr)
    assert kinds(events) == ["speech_started", "speech_stopped"], events
    assert abs(events[0].offset_ms - (500 + start_ms)) <= TOL_MS
    assert abs(events[1].offset_ms - (500 + end_ms)) <= TOL_MS, events


@pytest.mark.parametrize("rate", [24_000, 44_100])
def test_chunking_does_not_change_events(rate):
    speech, sr = load("speech_3s.wav")
    x = np.concatenate([silence(sr, 0.3), speech, silence(sr, 1.0), speech[: sr], silence(sr, 1.0)])
    x = x + silence(sr, len(x) / sr, -50.0, seed=3)[: len(x)]
    if rate != sr:
        x = soxr.resample(x, sr, rate).astype(np.float32)
    whole = SpeechDetector(CFG).push(x, rate)
    assert kinds(whole) == ["speech_started", "speech_stopped"] * 2, whole
    det = SpeechDetector(CFG)
    head = rate // 4  # the first 250 ms one sample at a time, then odd sizes (including empty chunks)
    events = [e for i in range(head) for e in det.push(x[i:i + 1], rate)]
    events += push_chunked(det, x[head:], rate, [7, 0, 331, 1, 4099, 13, 960, 2])
    assert events == whole


def test_short_gaps_do_not_split_a_turn_but_long_ones_do():
    """speech_14s has sentence pauses of about 340 ms: one turn at end_silence_ms=700, several at 250."""
    speech, sr = load("speech_14s.wav")
    x = np.concatenate([speech, silence(sr, 1.0)])
    assert kinds(SpeechDetector(CFG).push(x, sr)) == ["speech_started", "speech_stopped"]
    events = SpeechDetector(TurnTakingConfig(vad=True, end_silence_ms=250)).push(x, sr)
    assert len(events) >= 6 and kinds(events) == ["speech_started", "speech_stopped"] * (len(events) // 2)
    offsets = [e.offset_ms for e in events]
    assert offsets == sorted(offsets)


def test_blips_are_not_speech():
    speech, sr = load("speech_3s.wav")
    blip = speech[int(0.45 * sr):int(0.55 * sr)]  # 100 ms of speech, under min_speech_ms
    x = np.concatenate([silence(sr, 0.5), blip, silence(sr, 1.0)])
    assert SpeechDetector(CFG).push(x, sr) == []
    # A blip in the silence after speech neither extends the turn nor starts a new one.
    y = np.concatenate([speech, silence(sr, 0.4), blip, silence(sr, 1.0)])
    events = SpeechDetector(CFG).push(y, sr)
    assert kinds(events) == ["speech_started", "speech_stopped"], events
    assert abs(events[1].offset_ms - envelope_bounds(speech, sr)[1]) <= TOL_MS


def test_state_machine_on_scripted_vad_flags():
    """min_speech 3 frames, end_silence 10 frames, bridge 5 frames (150 ms); a scripted VAD without hangover."""
    flags = "VV" + "." * 10 + "VVV" + "...." + "VV" + "......" + "V" + "." * 12 + "VVV"

    class Scripted:
        def __init__(self):
            self.i = 0

        def is_speech(self, frame: bytes, sample_rate: int) -> bool:
            assert len(frame) == 2 * 480 and sample_rate == 16_000
            self.i += 1
            return flags[self.i - 1] == "V"

    det = SpeechDetector(TurnTakingConfig(vad=True, min_speech_ms=90, end_silence_ms=300), vad=Scripted())
    events = det.push(np.zeros(480 * len(flags), np.float32), 16_000)
    assert events == [
        Event("speech_started", 12 * 30, 15 * 30),  # the 2-frame blip before it is not speech
        Event("speech_stopped", 21 * 30, 31 * 30),  # the 4-frame gap is bridged; the lone frame at 27 is a blip
        Event("speech_started", 40 * 30, 43 * 30),
    ]


def test_speech_of_min_length_counts():
    speech, sr = load("speech_3s.wav")
    cut = speech[int(0.45 * sr):int(0.70 * sr)]  # 250 ms of speech
    events = SpeechDetector(CFG).push(np.concatenate([silence(sr, 0.5), cut, silence(sr, 1.0)]), sr)
    assert kinds(events) == ["speech_started", "speech_stopped"]
    assert abs(events[0].offset_ms - 500) <= 30 and abs(events[1].offset_ms - 750) <= 60, events


def test_reset_starts_a_new_stream():
    speech, sr = load("speech_1s.wav")
    x = np.concatenate([speech, silence(sr, 1.0)])
    det = SpeechDetector(CFG)
    first = det.push(x[: len(x) // 2], sr)
    assert kinds(first) == ["speech_started"] and det.in_speech
    det.reset()
    assert not det.in_speech and det.processed_ms == 0
    assert det.push(x, 48_000 // 2) is not None  # a new rate is allowed after reset
    det.reset()
    assert det.push(x, sr) == SpeechDetector(CFG).push(x, sr)


def test_bad_inputs():
    det = SpeechDetector(CFG)
    with pytest.raises(ValueError, match="mono"):
        det.push(np.zeros((100, 2), np.float32), 24_000)
    with pytest.raises(ValueError, match="float"):
        det.push(np.zeros(100, np.int16), 24_000)
    with pytest.raises(ValueError, match="sample_rate"):
        det.push(np.zeros(100, np.float32), 0)
    det.push(np.zeros(100, np.float32), 24_000)
    with pytest.raises(ValueError, match="changed"):
        det.push(np.zeros(100, np.float32), 16_000)
    # Non-finite and out-of-range samples do not break the detector.
    assert SpeechDetector(CFG).push(np.array([np.nan, np.inf, -np.inf, 5.0] * 2400, np.float32), 24_000) is not None
    for bad in ({"aggressiveness": 4}, {"frame_ms": 25}, {"end_silence_ms": 0}, {"min_speech_ms": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TurnTakingConfig(**bad)


@pytest.mark.parametrize("frame_ms", [10, 20])
def test_other_frame_lengths(frame_ms):
    speech, sr = load("speech_1s.wav")
    start_ms, end_ms = envelope_bounds(speech, sr)
    events = SpeechDetector(TurnTakingConfig(vad=True, frame_ms=frame_ms)).push(
        np.concatenate([speech, silence(sr, 1.0)]), sr)
    assert kinds(events) == ["speech_started", "speech_stopped"]
    assert abs(events[0].offset_ms - start_ms) <= TOL_MS and abs(events[1].offset_ms - end_ms) <= TOL_MS, events
