"""Training the Mimi codec: EMA split RVQ with dropout, multi-scale mel/STFT reconstruction, MS-STFT adversarial
stage with feature matching, semantic distillation hook, exact resume, held-out resynthesis metrics."""

from csm_jax.training.codec.config import LOSS_WEIGHTS, CodecOptimConfig, CodecTrainConfig, DistillConfig
from csm_jax.training.codec.data import AudioBank, AudioBankError, prepare_audio
from csm_jax.training.codec.discriminator import CodecDiscriminator, DiscriminatorConfig
from csm_jax.training.codec.rvq import RVQConfig, init_ema, quantize, update_ema, with_codebooks
from csm_jax.training.codec.step import CodecProgram, CodecState
from csm_jax.training.codec.trainer import ConfigMismatch, evaluate_codec, restore_codec, train_codec

__all__ = [
    "LOSS_WEIGHTS", "AudioBank", "AudioBankError", "CodecOptimConfig", "CodecProgram", "CodecState",
    "CodecTrainConfig", "ConfigMismatch", "DiscriminatorConfig", "DistillConfig", "CodecDiscriminator",
    "RVQConfig", "evaluate_codec", "init_ema", "prepare_audio", "quantize", "restore_codec", "train_codec",
    "update_ema", "with_codebooks",
]
