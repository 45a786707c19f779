"""The training loop: resume, train, log, evaluate, checkpoint.

A train loader is anything that iterates batches (`__iter__` / `__next__`; dicts of numpy arrays `tokens`, `mask`,
`targets`, `lengths`, see csm_jax.training.loss) and has `state() -> dict` (JSON-serialisable position after the
batches handed out so far) and `restore(dict)`. An eval loader is re-iterable (each `iter()` starts a fresh pass)
or a zero-argument callable returning a fresh iterable; `eval_batches` caps a pass.

Resuming is exact: the latest checkpoint in `<workdir>/checkpoints` restores parameters, optimizer state, step and
PRNG key (the step's key is derived from the key and the step number), and the loader position saved with it.

Several processes (`config.distributed`, see docs/distributed_training.md): every process calls `train` with the same
arguments and a loader yielding the same global batches (same data and seed); each copies only its own devices'
rows. All processes write their shards of each checkpoint (the workdir must be on a shared filesystem); process 0
writes metrics, the progress bar and the loader state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from csm_jax.csm.config import CsmConfig
from csm_jax.csm.weights import load_csm_params
from csm_jax.training.checkpointing import Checkpointer
from csm_jax.training.loss import LossConfig, finalize
from csm_jax.training.mesh import DistributedConfig, MeshConfig, make_train_mesh, maybe_initialize_distributed
from csm_jax.training.metrics import MetricsWriter, StepProfiler
from csm_jax.training.optim import OptimConfig
from csm_jax.training.step import TrainProgram

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """max_steps: optimizer updates in all (a resumed run continues to it); log_every / eval_every /
    checkpoint_every in steps (0: never; the last step is always logged and checkpointed, and evaluated when
    eval_every > 0); eval_batches: cap per eval pass; max_to_keep latest + keep_best best-by-eval-loss checkpoints;
    profile_steps: trace steps [a, b) into <workdir>/profile; init_from: CSM weights to fine-tune from (anything
    `csm_jax.csm.weights.load_csm_params` reads; used when not resuming and no params are passed); eval_loss: loss
    settings of eval (default `loss`)."""

    max_steps: int
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    keep_best: int = 1
    async_checkpointing: bool = True
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True
    profile_steps: tuple[int, int] | None = None
    init_from: str | None = None
    loss: LossConfig = LossConfig()
    eval_loss: LossConfig | None = None
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def initial_params(path: str | Path, model_cfg: CsmConfig) -> Any:
    """float32 parameters to fine-tune from `path` (converted, transformers or original CSM weights); their config
    must equal `model_cfg` up to the compute dtype, `input_codebooks` and `context_codebooks` (none changes the
    parameters: a model can be fine-tuned to read other codebooks)."""
    params, cfg = load_csm_params(path)
    reading = {"input_codebooks": model_cfg.input_codebooks, "context_codebooks": model_cfg.context_codebooks}
    if cfg.replace(dtype=model_cfg.dtype, **reading) != model_cfg:
        raise ValueError(f"{path} holds a different model than the training config:\n  {cfg}\n  vs {model_cfg}")
    if any(getattr(cfg, name) != value for name, value in reading.items()):
        log.info("fine-tuning %s (input_codebooks %s, context_codebooks %s) to read input_codebooks %s, "
                 "context_codebooks %s", path, cfg.input_codebooks, cfg.context_codebooks, *reading.values())
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _fresh_iterable(loader: Iterable[Any] | Callable[[], Iterable[Any]]) -> Iterable[Any]:
    return loader() if callable(loader) and not hasattr(loader, "__iter__") else loader


def evaluate(program: TrainProgram, params: Any, eval_loader: Any, max_batches: int | None = None,
             loss_cfg: LossConfig | None = None) -> dict[str, Any]:
    """Loss metrics (`finalize`) over one pass of `eval_loader`, frames weighted exactly (sums over batches), plus
    `batches`."""
    total, n = None, 0
    for batch in _fresh_iterable(eval_loader):
        if max_batches is not None and n >= max_batches:
            break
        stats = program.eval_stats(params, batch)
        total = stats if total is None else jax.tree.map(lambda a, b: a + b, total, stats)
        n += 1
    if total is None:
        raise ValueError("the eval loader gave no batches")
    host = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(total))
    return finalize(host, loss_cfg or program.loss_cfg, xp=np) | {"batches": n}


def _frames(batch: dict[str, Any]) -> int:
    if "lengths" in batch:
        return int(np.sum(batch["lengths"]))
    return int(np.sum(np.any(np.asarray(batch["mask"]), axis=-1)))


def _window_mean(window: list[dict[str, Any]]) -> dict[str, Any]:
    host = jax.device_get(window)
    out = {k: np.mean([np.asarray(m[k], np.float64) for m in host], axis=0) for k in host[0]}
    out["lr"] = np.asarray(host[-1]["lr"])
    return out


def train(
    config: TrainConfig,
    model_cfg: CsmConfig,
    train_loader: Any,
    eval_loader: Any = None,
    workdir: str | Path = "train_run",
    params: Any | Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Train to `config.max_steps`, resuming from `<workdir>/checkpoints` when there is a checkpoint (and
    config.resume). `params`: float32 initial parameters (fine-tuning; or set config.init_from), or a
    zero-argument function making them; ignored (never called) on resume.
    Returns a summary: step, start_step, resumed, train (last logged metrics), eval (last eval), best_step,
    best_eval_loss, elapsed_s, workdir."""
    maybe_initialize_distributed(config.distributed)
    workdir = Path(workdir).absolute()
    mesh = make_train_mesh(config.mesh)
    program = TrainProgram(model_cfg, config.loss, config.optim, mesh, config.mesh.resolved_rules(),
                           total_steps=config.max_steps, eval_loss_cfg=config.eval_loss, eval_seed=config.seed)
    eval_cfg = config.eval_loss or config.loss
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.max_to_keep, keep_best=config.keep_best,
                                async_save=config.async_checkpointing)
    writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
    profiler = StepProfiler(workdir / "profile", *config.profile_steps) if config.profile_steps else None
    is_main = jax.process_index() == 0
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": str(workdir), "train": None, "eval": None}
    bar = None
    try:
        latest = checkpointer.latest_step() if config.resume else None
        if latest is not None:
            state, meta = checkpointer.restore(program.abstract_state, latest)
            train_loader.restore(meta["loader"])
            log.info("resumed from step %d (%s)", latest, checkpointer.directory)
        else:
            if callable(params):
                params = params()
            if params is None and config.init_from:
                params = initial_params(config.init_from, model_cfg)
                log.info("fine-tuning from %s", config.init_from)
            state = program.init_state(jax.random.key(config.seed), params)
        start = int(jax.device_get(state.step))
        summary.update(start_step=start, resumed=latest is not None)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        n_train = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(state.params),
                                                              jax.tree.leaves(program.trainable)) if t)
        log.info("parameters: %d (%d trainable); mesh %s", n_params, n_train, dict(mesh.shape))

        iterator = iter(train_loader)
        bar = tqdm(total=config.max_steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (config.progress and is_main))
        window: list[dict[str, Any]] = []
        window_frames, window_start = 0, time.time()
        step = start
        while step < config.max_steps:
            try:
                batch = next(iterator)
            except StopIteration:
                log.warning("train loader exhausted at step %d", step)
                break
            if profiler is not None:
                profiler.before(step)
            state, metrics = program.train_step(state, batch)
            if profiler is not None:
                profiler.after(step, metrics)
            step += 1
            window.append(metrics)
            window_frames += _frames(batch)
            bar.update(1)
            last = step == config.max_steps

            if window and ((config.log_every and step % config.log_every == 0) or last):
                means = _window_mean(window)
                elapsed = max(time.time() - window_start, 1e-9)
                means |= {"steps_per_s": len(window) / elapsed, "frames_per_s": window_frames / elapsed}
                summary["train"] = writer.write(step, means, prefix="train/")
                bar.set_postfix(loss=f"{float(means['loss']):.4f}", lr=f"{float(means['lr']):.2e}", refresh=False)
                log.info("step %d: loss %.4f (c0 %.4f, depth %.4f), grad norm %.3f, %.2f steps/s", step,
                         means["loss"], means["c0_loss"], means["depth_loss"], means["grad_norm"],
                         means["steps_per_s"])
                window, window_frames, window_start = [], 0, time.time()

            eval_flat = None
            if eval_loader is not None and config.eval_every and (step % config.eval_every == 0 or last):
                eval_flat = writer.write(step, evaluate(program, state.params, eval_loader, config.eval_batches,
                                                        eval_cfg), prefix="eval/")
                summary["eval"] = eval_flat
                log.info("step %d: eval loss %.4f", step, eval_flat["eval/loss"])

            if (config.checkpoint_every and step % config.checkpoint_every == 0) or last or eval_flat is not None:
                meta = {"step": step, "loader": train_loader.state(), "train": summary["train"],
                        "eval": eval_flat, "config": config.to_dict(), "model_config": model_cfg.to_dict()}
                checkpointer.save(step, state, meta, eval_flat)
        summary["step"] = step
        checkpointer.wait()
        best = checkpointer.best_step()
        summary["best_step"] = best
        summary["best_eval_loss"] = (checkpointer.metrics(best) or {}).get("eval/loss") if best is not None else None
    finally:
        if bar is not None:
            bar.close()
        if profiler is not None:
            profiler.close()
        checkpointer.close()
        writer.close()
    summary["elapsed_s"] = time.time() - t0
    return summary
