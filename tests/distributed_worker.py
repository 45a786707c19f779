"""One training process of tests/test_distributed_training.py: `python tests/distributed_worker.py JSON` with JSON
{"workdir", "max_steps", "distributed": DistributedConfig fields}. Runs `csm_jax.training.train` on the tiny CSM and
synthetic batches (`batches()`, the same global batches on every process); prints one JSON line
{"process", "processes", "devices", "step", "start_step"}. XLA_FLAGS sets the CPU devices of the process."""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys

import numpy as np

from csm_jax.training.loss import LossConfig
from csm_jax.training.mesh import DistributedConfig, MeshConfig
from csm_jax.training.optim import OptimConfig
from csm_jax.training.synthetic import ListLoader, synthetic_batch, tiny_config
from csm_jax.training.trainer import TrainConfig, train

CFG = tiny_config()
CONFIG = TrainConfig(
    max_steps=3, seed=3, log_every=1, checkpoint_every=0, progress=False, tensorboard=False,
    loss=LossConfig(depth_fraction=0.25), optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=10),
    mesh=MeshConfig(data=4, fsdp=2),
)


def batches() -> list[dict[str, np.ndarray]]:
    """4 global batches of 8 sequences x 16 rows (a learnable repeating audio pattern)."""
    pattern = np.random.default_rng(0).integers(1, CFG.audio_vocab_size, (5, CFG.num_codebooks))
    return [synthetic_batch(CFG, 8, 16, rng=i, pattern=pattern) for i in range(4)]


def main(args: dict) -> None:
    import jax

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # JAX may abort
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    dist = DistributedConfig(**args["distributed"])
    config = dataclasses.replace(CONFIG, max_steps=args["max_steps"], distributed=dist)
    summary = train(config, CFG, ListLoader(batches()), workdir=args["workdir"])
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "step": summary["step"], "start_step": summary["start_step"]}),
          flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
