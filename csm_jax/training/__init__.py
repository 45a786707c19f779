"""Training CSM: loss (codebook 0 on every target frame, amortised depth decoder), AdamW with warmup + cosine and
freezing, sharded jitted steps, orbax checkpoints, metrics, and the training loop."""

from csm_jax.training.checkpointing import Checkpointer
from csm_jax.training.loss import LossConfig, compute_loss, reference_loss, select_depth_frames
from csm_jax.training.mesh import (TRAIN_RULES, DistributedConfig, MeshConfig, make_train_mesh,
                                   maybe_initialize_distributed)
from csm_jax.training.metrics import MetricsWriter, StepProfiler, read_jsonl
from csm_jax.training.optim import OptimConfig, lr_schedule, make_optimizer, param_groups, trainable_mask
from csm_jax.training.state import TrainState, init_state
from csm_jax.training.step import TrainProgram
from csm_jax.training.trainer import TrainConfig, evaluate, initial_params, train

__all__ = [
    "Checkpointer", "DistributedConfig", "LossConfig", "MeshConfig", "MetricsWriter", "OptimConfig", "StepProfiler",
    "TRAIN_RULES", "TrainConfig", "TrainProgram", "TrainState", "compute_loss", "evaluate", "init_state",
    "initial_params", "lr_schedule", "make_optimizer", "make_train_mesh", "maybe_initialize_distributed",
    "param_groups", "read_jsonl", "reference_loss", "select_depth_frames", "train", "trainable_mask",
]
