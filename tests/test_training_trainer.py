"""The training loop resumes exactly: a run that crashes after step 5 (last checkpoint at step 4) and is restarted
from its checkpoint in a fresh trainer and loader logs the same losses and ends with the same parameters,
optimizer state and PRNG key as an uninterrupted run (sharded, data x fsdp x tensor = 2 x 2 x 2)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.csm.weights import save_converted
from csm_jax.training.checkpointing import Checkpointer
from csm_jax.training.loss import LossConfig
from csm_jax.training.mesh import DistributedConfig, MeshConfig, make_train_mesh, maybe_initialize_distributed
from csm_jax.training.metrics import read_jsonl
from csm_jax.training.optim import OptimConfig
from csm_jax.training.state import init_params
from csm_jax.training.step import TrainProgram
from csm_jax.training.synthetic import ListLoader, synthetic_batch, tiny_config
from csm_jax.training.trainer import TrainConfig, initial_params, train

CFG = tiny_config()
CONFIG = TrainConfig(
    max_steps=6, seed=3, log_every=1, eval_every=3, eval_batches=2, checkpoint_every=2, max_to_keep=2, keep_best=1,
    progress=False, loss=LossConfig(depth_fraction=0.25), optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
    mesh=MeshConfig(data=2, fsdp=2, tensor=2),
)


class CrashingLoader(ListLoader):
    def __init__(self, batches, crash_at: int) -> None:
        super().__init__(batches)
        self.crash_at = crash_at

    def __next__(self):
        if self.position == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().__next__()


def _losses(workdir) -> dict[int, dict[str, float]]:
    """step -> last logged train metrics (a resumed run logs the re-run steps again)."""
    return {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r}


def _restore(workdir, step):
    program = TrainProgram(CFG, CONFIG.loss, CONFIG.optim, make_train_mesh(CONFIG.mesh),
                           CONFIG.mesh.resolved_rules(), total_steps=CONFIG.max_steps, eval_seed=CONFIG.seed)
    with Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore(program.abstract_state, step), program


def test_resume_after_crash_is_exact(tmp_path):
    assert jax.device_count() == 8
    params = backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0))
    pattern = np.random.default_rng(0).integers(1, CFG.audio_vocab_size, (5, CFG.num_codebooks))
    batches = [synthetic_batch(CFG, 8, 16, rng=i, pattern=pattern) for i in range(7)]
    train_batches, eval_batches = batches[:5], batches[5:]

    profiled = dataclasses.replace(CONFIG, profile_steps=(1, 3))
    full = train(profiled, CFG, ListLoader(train_batches), eval_batches, tmp_path / "full", params=params)
    assert full["step"] == 6 and not full["resumed"]
    assert full["eval"]["eval/batches"] == 2

    made = []  # the crashed run gets its parameters from a function: called when it starts, not on resume

    def make_params():
        made.append(1)
        return params

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(CONFIG, CFG, CrashingLoader(train_batches, crash_at=5), eval_batches, tmp_path / "crash",
              params=make_params)
    assert len(made) == 1
    with Checkpointer(tmp_path / "crash" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 4
    resumed = train(CONFIG, CFG, ListLoader(train_batches), eval_batches, tmp_path / "crash", params=make_params)
    assert resumed["resumed"] and resumed["start_step"] == 4 and resumed["step"] == 6
    assert len(made) == 1

    ref, got = _losses(tmp_path / "full"), _losses(tmp_path / "crash")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        for name in ("train/loss", "train/c0_loss", "train/depth_loss", "train/grad_norm", "train/lr"):
            assert got[step][name] == ref[step][name], (step, name)
    crashed_step5 = [r for r in read_jsonl(tmp_path / "crash" / "metrics.jsonl") if r["step"] == 5]
    assert len(crashed_step5) == 2 and crashed_step5[0]["train/loss"] == crashed_step5[1]["train/loss"]
    assert ref[6]["train/loss"] < ref[1]["train/loss"]
    assert resumed["eval"]["eval/loss"] == full["eval"]["eval/loss"]

    (state_ref, meta_ref), program = _restore(tmp_path / "full", 6)
    (state_got, meta_got), _ = _restore(tmp_path / "crash", 6)
    assert meta_ref["loader"] == meta_got["loader"] == {"position": 6}
    assert int(state_got.step) == 6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_ref), jax.tree.leaves(state_got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    for a, want in zip(jax.tree.leaves(state_got), jax.tree.leaves(program.state_shardings)):
        assert a.sharding == want  # restored in the training layout

    # retention: the 2 latest plus the best evaluated; metadata and TensorBoard events written
    with Checkpointer(tmp_path / "full" / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
        assert {4, 6} <= set(steps) and 2 not in steps
        assert full["best_step"] in (3, 6) and full["best_step"] in steps
        assert full["best_eval_loss"] == min(ckpt.metrics(s)["eval/loss"] for s in (3, 6) if s in steps)
    assert meta_ref["config"]["max_steps"] == 6 and meta_ref["model_config"]["num_codebooks"] == CFG.num_codebooks
    json.dumps(meta_ref)
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "full" / "profile").rglob("*.xplane.pb"))


def test_fine_tuning_weights_and_single_process_defaults(tmp_path):
    params = backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0))
    save_converted(tmp_path / "csm", jax.device_get(params), CFG)
    loaded = initial_params(tmp_path / "csm", CFG.replace(dtype="bfloat16"))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="different model"):
        initial_params(tmp_path / "csm", tiny_config(num_codebooks=3))
    # reading fewer input codebooks changes no parameter: a model trained on all of them can be fine-tuned into it
    for reading in ({"input_codebooks": 1}, {"input_codebooks": 1, "context_codebooks": CFG.num_codebooks}):
        narrowed = initial_params(tmp_path / "csm", CFG.replace(**reading))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(narrowed), jax.tree.leaves(loaded)))
    assert maybe_initialize_distributed(DistributedConfig()) is False
    assert maybe_initialize_distributed(None) is False
