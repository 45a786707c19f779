"""Kyutai's Mimi codec in Flax: RVQ encoder, RVQ decoder and streaming SEANet vocoder."""

from csm_jax.codec.codec import MimiCodec, StreamDecoder, StreamEncoder, load_codec
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.mimi import Mimi

__all__ = ["Mimi", "MimiCodec", "MimiConfig", "StreamDecoder", "StreamEncoder", "load_codec"]
