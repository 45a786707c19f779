"""Pitch (F0) tracking with Praat's autocorrelation method (via praat-parselmouth) and a frame-wise F0 comparison of
a resynthesised or generated waveform with its reference.
"""

from __future__ import annotations

import numpy as np

from csm_jax.audio.processor import SAMPLE_RATE

TIME_STEP = 0.01  # s between pitch frames
PITCH_FLOOR = 60.0  # Hz; Praat's analysis window is 3 periods of the floor (50 ms)
PITCH_CEILING = 600.0  # Hz
GROSS_ERROR = 0.2  # relative F0 deviation counted as a gross (e.g. octave) error


def f0_track(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, time_step: float = TIME_STEP,
             pitch_floor: float = PITCH_FLOOR, pitch_ceiling: float = PITCH_CEILING) -> tuple[np.ndarray, np.ndarray]:
    """Praat's autocorrelation pitch track (To Pitch (ac), default costs and thresholds) of float mono audio [N].

    Frames are `time_step` s apart and centred in the signal, so equal-length inputs share one time grid.
    Returns (f0 float64 [T] in Hz, 0 where unvoiced; voiced bool [T]); T = 0 for audio shorter than Praat's
    3 / pitch_floor s analysis window.
    """
    import parselmouth

    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {list(audio.shape)}")
    if audio.size <= 3.0 / pitch_floor * sample_rate:
        return np.zeros(0), np.zeros(0, bool)
    pitch = parselmouth.Sound(audio, sampling_frequency=sample_rate).to_pitch_ac(
        time_step=time_step, pitch_floor=pitch_floor, pitch_ceiling=pitch_ceiling)
    f0 = np.asarray(pitch.selected_array["frequency"], np.float64)
    return f0, f0 > 0


def f0_batch(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, **track_kwargs: float) -> np.ndarray:
    """`f0_track` of each row of float audio [B, N] -> float32 [B, T] in Hz, 0 where unvoiced (equal-length rows
    share one grid): the codec trainer's pitch targets."""
    return np.stack([f0_track(row, sample_rate, **track_kwargs)[0] for row in np.asarray(audio)]).astype(np.float32)


def f0_error(ref: np.ndarray, est: np.ndarray, sample_rate: int = SAMPLE_RATE,
             **track_kwargs: float) -> dict[str, float]:
    """Frame-wise F0 agreement of float waveforms [N] (both cut to the shorter length so the frames align).

    Returns floats: `median_rel_error` median |f0_est - f0_ref| / f0_ref over frames voiced in both (NaN if none),
    `gross_error_rate` fraction of those frames off by more than 20 % (NaN if none), `voicing_agreement` fraction
    of all frames with the same voiced decision (NaN if there are no frames), `ref_f0_hz` the median F0 of the
    frames `ref` voices (NaN if none), and `voiced_frames` (int) the number of frames voiced in both.
    `track_kwargs` go to `f0_track`.
    """
    n = min(len(ref), len(est))
    f0_ref, v_ref = f0_track(np.asarray(ref)[:n], sample_rate, **track_kwargs)
    f0_est, v_est = f0_track(np.asarray(est)[:n], sample_rate, **track_kwargs)
    both = v_ref & v_est
    rel = np.abs(f0_est[both] - f0_ref[both]) / f0_ref[both]
    return {
        "median_rel_error": float(np.median(rel)) if rel.size else float("nan"),
        "gross_error_rate": float(np.mean(rel > GROSS_ERROR)) if rel.size else float("nan"),
        "voicing_agreement": float(np.mean(v_ref == v_est)) if v_ref.size else float("nan"),
        "ref_f0_hz": float(np.median(f0_ref[v_ref])) if v_ref.any() else float("nan"),
        "voiced_frames": int(both.sum()),
    }
