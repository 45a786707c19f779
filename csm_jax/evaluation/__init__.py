"""Evaluation beyond the loss: intelligibility of generated speech, signal-level codec metrics, pitch, speaker
similarity, and whether a CSM reads its text (teacher-forced)."""

from csm_jax.evaluation.intelligibility import Intelligibility, normalize, word_error_rate
from csm_jax.evaluation.pitch import f0_error, f0_track
from csm_jax.evaluation.reading import code_source_wer, reading_profile, same_voice_pairs
from csm_jax.evaluation.signal import mel_distance, mel_filterbank, si_snr, stft_magnitude
from csm_jax.evaluation.speaker import closer_to_prompt, feature_scale, speaker_distance, speaker_features

__all__ = [
    "Intelligibility",
    "closer_to_prompt",
    "code_source_wer",
    "f0_error",
    "f0_track",
    "feature_scale",
    "mel_distance",
    "mel_filterbank",
    "normalize",
    "reading_profile",
    "same_voice_pairs",
    "si_snr",
    "speaker_distance",
    "speaker_features",
    "stft_magnitude",
    "word_error_rate",
]
