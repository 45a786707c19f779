"""Dialogue: what turns a stream of user audio into conversation turns and answers (speech recognition, voice
activity and turn-taking, reply text from a chat model)."""

from csm_jax.dialogue.responder import (
    ERROR_CODES,
    Responder,
    ResponderConfig,
    ResponderError,
    build_responder,
    sentences,
)
from csm_jax.dialogue.transcriber import (
    InvalidAudioError,
    PocketsphinxTranscriber,
    Transcriber,
    TranscriberConfig,
    TranscriptionError,
    TransformersTranscriber,
    build_transcriber,
)
from csm_jax.dialogue.turn_taking import Event, SpeechDetector, TurnTakingConfig

__all__ = [
    "ERROR_CODES",
    "Event",
    "InvalidAudioError",
    "PocketsphinxTranscriber",
    "Responder",
    "ResponderConfig",
    "ResponderError",
    "SpeechDetector",
    "Transcriber",
    "TranscriberConfig",
    "TranscriptionError",
    "TransformersTranscriber",
    "TurnTakingConfig",
    "build_responder",
    "build_transcriber",
    "sentences",
]
