"""Train step: the loss falls on a repetitive stream; sharded steps (8 CPU devices: data x fsdp, data x fsdp x tensor)
equal the single-device step; gradient accumulation equals one step on the whole batch; frozen parameter groups
stay bit-identical and get no optimizer state; bf16 compute trains and stays finite."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from csm_jax import backend
from csm_jax.training.loss import LossConfig
from csm_jax.training.mesh import MeshConfig, make_train_mesh
from csm_jax.training.optim import OptimConfig, param_groups
from csm_jax.training.state import init_params
from csm_jax.training.step import TrainProgram
from csm_jax.training.synthetic import synthetic_batch, tiny_config

CFG = tiny_config()
LOSS = LossConfig(depth_fraction=0.25)
OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=2)
STEPS = 40


@pytest.fixture(scope="module")
def params():
    return backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
    pattern = np.random.default_rng(0).integers(1, CFG.audio_vocab_size, (5, CFG.num_codebooks))
    return [synthetic_batch(CFG, 8, 16, rng=i, pattern=pattern) for i in range(2)]


def _run(program: TrainProgram, params, batches, steps: int):
    state = program.init_state(jax.random.key(1), params)
    history = []
    for i in range(steps):
        state, metrics = program.train_step(state, batches[i % len(batches)])
        history.append(jax.device_get(metrics))
    return state, history


def _params_close(a, b, atol: float) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_loss_falls_on_a_repetitive_stream(params, batches):
    program = TrainProgram(CFG, LOSS, OPTIM, total_steps=STEPS)
    _, history = _run(program, params, batches, STEPS)
    loss = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(loss))
    assert loss[-5:].mean() < 0.5 * loss[0], loss
    for name in ("c0_loss", "depth_loss"):
        assert np.mean([h[name] for h in history[-5:]]) < 0.7 * history[0][name], name
    assert history[0]["lr"] == pytest.approx(OPTIM.learning_rate / 2)  # warmup: update 1 of 2
    assert history[1]["lr"] == pytest.approx(OPTIM.learning_rate)
    assert history[-1]["lr"] < history[1]["lr"]  # cosine decay
    assert history[0]["depth_frames"] < history[0]["c0_frames"]


@pytest.mark.parametrize("shape", [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_step_equals_single_device(shape, params, batches):
    assert jax.device_count() == 8
    single_state, single = _run(TrainProgram(CFG, LOSS, OPTIM, total_steps=STEPS), params, batches, 3)
    program = TrainProgram(CFG, LOSS, OPTIM, mesh=make_train_mesh(MeshConfig(**shape)), total_steps=STEPS)
    state, sharded = _run(program, params, batches, 3)

    kernel = state.params["backbone"]["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [mlp, embed]
    assert kernel.sharding.spec == PartitionSpec("tensor", "fsdp")
    mlp, embed = CFG.backbone.intermediate_size, CFG.backbone.hidden_size
    assert kernel.sharding.shard_shape(kernel.shape) == (mlp // shape.get("tensor", 1), embed // shape["fsdp"])
    assert program.shard_batch(batches[0])["tokens"].sharding.spec[0] == ("data", "fsdp")
    mu = jax.tree.leaves(state.opt_state)[1]  # an Adam moment is placed like its parameter
    assert len(mu.sharding.device_set) == 8

    for s, h in zip(single, sharded):
        for name in ("loss", "c0_loss", "depth_loss", "grad_norm", "cb_loss"):
            np.testing.assert_allclose(h[name], s[name], rtol=1e-5, atol=1e-6, err_msg=name)
        for name in ("c0_frames", "depth_frames", "depth_tokens", "lr"):
            assert h[name] == s[name], name
    _params_close(state.params, single_state.params, atol=1e-5)
    assert int(state.step) == 3


def test_gradient_accumulation_equals_one_step_on_the_whole_batch(params, batches):
    loss = LossConfig(depth_fraction=1.0)  # every target frame: the draw does not depend on the split
    whole = TrainProgram(CFG, loss, OPTIM, total_steps=STEPS)
    accum = TrainProgram(CFG, loss, OptimConfig(learning_rate=3e-3, warmup_steps=2, grad_accum=2),
                         total_steps=STEPS)
    state_w, hist_w = _run(whole, params, batches, 2)
    state_a, hist_a = _run(accum, params, batches, 2)
    for w, a in zip(hist_w, hist_a):
        for name in ("loss", "c0_loss", "depth_loss", "grad_norm", "c0_accuracy"):
            np.testing.assert_allclose(a[name], w[name], rtol=1e-5, err_msg=name)
        assert a["c0_frames"] == w["c0_frames"] and a["depth_tokens"] == w["depth_tokens"]
    # Adam divides each gradient by its own running magnitude, so summation-order rounding in a near-zero gradient
    # can move that weight by a visible fraction of the learning rate (3e-3): 1.13e-5 on one CPU type.
    _params_close(state_a.params, state_w.params, atol=5e-5)


def test_frozen_groups_stay_bit_identical_without_optimizer_state(params, batches):
    groups = param_groups(CFG, params)
    flags = np.array([jax.tree.leaves(groups[g]) for g in ("embeddings", "backbone", "depth")])
    assert np.all(flags.sum(axis=0) == 1)  # every parameter in exactly one group

    program = TrainProgram(CFG, LOSS, OptimConfig(learning_rate=3e-3, warmup_steps=2,
                                                  freeze=("embeddings", "backbone")), total_steps=STEPS)
    expected = jax.tree.map(lambda e, b: not (e or b), groups["embeddings"], groups["backbone"])
    assert jax.tree.leaves(program.trainable) == jax.tree.leaves(expected)
    state, history = _run(program, params, batches, 3)
    assert history[-1]["loss"] < history[0]["loss"]
    n_frozen = n_trained = 0
    for before, after, trained in zip(jax.tree.leaves(params), jax.tree.leaves(state.params),
                                      jax.tree.leaves(program.trainable)):
        if trained:
            n_trained += 1
            assert not np.array_equal(np.asarray(before), np.asarray(after))
        else:
            n_frozen += 1
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert n_frozen and n_trained
    # Adam keeps two moments per trainable leaf only (frozen leaves hold empty MaskedNodes)
    sizes = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    n_trainable_values = sum(x.size for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(program.trainable))
                             if t)
    assert sum(sizes) == 2 * n_trainable_values


def test_bf16_compute_trains_and_stays_finite(params, batches):
    cfg = tiny_config(dtype="bfloat16")
    program = TrainProgram(cfg, LOSS, OPTIM, total_steps=STEPS)
    state, history = _run(program, params, batches, 12)
    _, fp32 = _run(TrainProgram(CFG, LOSS, OPTIM, total_steps=STEPS), params, batches, 1)
    loss = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite([h["grad_norm"] for h in history]))
    assert abs(loss[0] - fp32[0]["loss"]) < 0.05 * fp32[0]["loss"]  # bf16 matmuls, fp32 loss
    assert loss[-3:].mean() < 0.8 * loss[0]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))  # fp32 master weights
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
