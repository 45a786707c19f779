"""csm-jax: Sesame CSM and Kyutai Mimi in JAX/Flax, for research and streaming serving."""

from csm_jax.audio import SAMPLE_RATE, AudioError, decode_pcm, load_audio
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec import MimiCodec, MimiConfig, load_codec
from csm_jax.csm import CsmConfig, Generator, Segment, load_csm

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "CheckpointError",
    "CsmConfig",
    "Generator",
    "MimiCodec",
    "MimiConfig",
    "Segment",
    "decode_pcm",
    "load_audio",
    "load_codec",
    "load_csm",
]
