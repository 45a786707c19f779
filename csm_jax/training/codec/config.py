"""Codec training settings (`CodecTrainConfig`), built from the Hydra `train_codec` config."""

from __future__ import annotations

import dataclasses
from typing import Any

from csm_jax.training.codec.discriminator import DiscriminatorConfig
from csm_jax.training.codec.rvq import RVQConfig
from csm_jax.training.mesh import DistributedConfig, MeshConfig

# EnCodec/DAC-style defaults. `mel` is DAC's multi-scale mel L1 (weight 15); `stft` multi-resolution spectral
# convergence + log magnitude; `waveform` L1 (off by default); `commit` the EMA-VQ commitment (EnCodec: 1);
# `adversarial` hinge and `feature` relative feature matching (DAC: 1 and 2); `distill` the semantic codebook's
# cosine distance to a teacher feature (Mimi's WavLM distillation; used only with a teacher); `pitch` the
# reconstruction's periodicity at the reference's pitch period (`losses.periodicity_loss`, Praat F0 of each crop;
# off by default).
LOSS_WEIGHTS = {"mel": 15.0, "stft": 1.0, "waveform": 0.0, "commit": 1.0, "adversarial": 1.0, "feature": 2.0,
                "distill": 1.0, "pitch": 0.0}


@dataclasses.dataclass(frozen=True)
class CodecOptimConfig:
    """AdamW for the codec (`learning_rate`) and the discriminator (`disc_learning_rate`): linear warmup, then
    constant (so a run can be extended by raising max_steps); gradients clipped by global norm."""

    learning_rate: float = 3e-4
    disc_learning_rate: float = 3e-4
    b1: float = 0.5
    b2: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 100
    clip: float = 1000.0
    disc_clip: float = 10.0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`teacher`: "module:function" mapping float32 audio [B, N] at the codec rate to float32 features
    [B, frames, dim] (one per codec frame), or None; the semantic codebook's output is projected to `dim`."""

    teacher: str | None = None
    dim: int = 0


# Settings that may change when a run is resumed; everything else must match the checkpoint.
# SCHEDULE_CHANGES are steps at which a stage starts: they may change on resume while neither the saved nor the new
# step has been reached (the change acts only on the future, so the run so far stays what it was).
SCHEDULE_CHANGES = frozenset({"adversarial_start", "freeze_codes_at"})
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "eval_every", "eval_utterances", "eval_max_seconds",
                               "eval_asr", "checkpoint_every", "max_to_keep", "keep_best", "async_checkpointing",
                               "progress", "tensorboard", "resume"})


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    """max_steps: generator updates in all; init: a Mimi checkpoint (anything `load_codec` reads: a trained run's
    export, the official kyutai/mimi) whose weights and codebooks a new run starts from (fine-tuning; fresh
    optimiser and discriminator), or a codec training run's directory, whose latest weights, codebooks and
    discriminator it goes on from (fresh optimisers; other losses, crops or learning rates);
    batch_size x segment_frames codec frames of audio per step;
    adversarial_start: step from which the discriminator trains and the adversarial/feature losses apply
    (None: never); freeze_codes_at: step from which what makes the codes (encoder, encoder transformer,
    downsampling, quantizer input projections, EMA codebooks) stays fixed and only the decoder side trains, so a
    CSM can train on the codes while the decoder keeps improving (None: never); losses: weights by name (unknown
    names are errors; missing names take LOSS_WEIGHTS); eval_every / eval_utterances / eval_max_seconds: held-out
    resynthesis metrics (mel distance, SI-SNR, F0 error; word error rate with eval_asr)."""

    max_steps: int
    seed: int = 0
    init: str | None = None
    batch_size: int = 8
    segment_frames: int = 12
    adversarial_start: int | None = None
    freeze_codes_at: int | None = None
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    rvq: RVQConfig = RVQConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    distill: DistillConfig = DistillConfig()
    optim: CodecOptimConfig = CodecOptimConfig()
    log_every: int = 50
    eval_every: int = 1000
    eval_utterances: int = 16
    eval_max_seconds: float = 6.0
    eval_asr: bool = False
    checkpoint_every: int = 500
    max_to_keep: int = 2
    keep_best: int = 1
    async_checkpointing: bool = True
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown codec loss name(s) {sorted(unknown)}; known: {sorted(LOSS_WEIGHTS)}")
        if any(w < 0 for w in self.losses.values()):
            raise ValueError("codec loss weights must be >= 0")
        if self.max_steps < 1 or self.batch_size < 1 or self.segment_frames < 1:
            raise ValueError("max_steps, batch_size and segment_frames must be >= 1")
        for name in SCHEDULE_CHANGES:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 or null")
        if (self.distill.teacher is None) != (self.distill.dim == 0):
            raise ValueError("distill.teacher and distill.dim (> 0) go together")

    @property
    def weights(self) -> dict[str, float]:
        return LOSS_WEIGHTS | {k: float(v) for k, v in self.losses.items()}

    def stage(self, step: int) -> tuple[bool, bool]:
        """(adversarial, codes frozen) for the update that starts at `step`."""
        on = lambda start: start is not None and step >= start
        return on(self.adversarial_start), on(self.freeze_codes_at)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
