"""Audio loading and PCM decoding to mono float32 at the codec rate."""

from csm_jax.audio.processor import SAMPLE_RATE, AudioError, AudioTooLong, PcmStream, decode_pcm, load_audio

__all__ = ["SAMPLE_RATE", "AudioError", "AudioTooLong", "PcmStream", "decode_pcm", "load_audio"]
