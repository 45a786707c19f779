"""The codec training loop: resume exactly, train on random crops, log, evaluate held-out resynthesis, checkpoint.

Batches depend only on (seed, step) and the step's PRNG key on (state.rng, step), so a run killed at any point
and restarted from its latest checkpoint reproduces the uninterrupted run's losses bit for bit. A resumed run
must have the same settings as the checkpoint, except those in `RESUMABLE_CHANGES` (e.g. max_steps) and stage
starts (`SCHEDULE_CHANGES`) that neither run has reached.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.evaluation.pitch import f0_batch
from csm_jax.training.checkpointing import Checkpointer
from csm_jax.training.codec.config import LOSS_WEIGHTS, RESUMABLE_CHANGES, SCHEDULE_CHANGES, CodecTrainConfig
from csm_jax.training.codec.data import AudioBank
from csm_jax.training.codec.step import CodecProgram, CodecState
from csm_jax.training.mesh import make_train_mesh, maybe_initialize_distributed
from csm_jax.training.metrics import MetricsWriter

log = logging.getLogger(__name__)


class ConfigMismatch(ValueError):
    """A resumed run's settings differ from those its checkpoints were trained with."""


def load_teacher(spec: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """"module:function" -> the function (audio float32 [B, N], sample_rate) -> features float32 [B, T, dim]."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"distill.teacher must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load distillation teacher {spec!r}: {e}") from e


def _diff(saved: Any, now: Any, where: str = "", step: int = 0) -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            if not where and key in RESUMABLE_CHANGES:
                continue
            if not where and key in SCHEDULE_CHANGES and all(
                    v is None or v >= step for v in (saved.get(key), now.get(key))):
                continue  # a stage that has not started yet may move
            out += _diff(saved.get(key), now.get(key), f"{where}{key}.")
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [] if norm(saved) == norm(now) else [f"{where.rstrip('.')}: {saved!r} -> {now!r}"]


def check_resume(meta: dict[str, Any], cfg: CodecTrainConfig, codec_cfg: MimiConfig) -> None:
    """Raise ConfigMismatch naming every setting that differs from the checkpoint's (a loss weight left out counts
    as its default)."""
    weights = lambda config: config | {"losses": LOSS_WEIGHTS | dict(config.get("losses") or {})}  # noqa: E731
    changes = _diff(weights(meta["config"]), weights(cfg.to_dict()), step=int(meta["step"]))
    changes += _diff(meta["codec_config"], codec_cfg.to_dict(), "codec.")
    if changes:
        raise ConfigMismatch("cannot resume: the settings differ from the checkpoint's (use a new workdir, or "
                             "restore them):\n  " + "\n  ".join(changes))


def evaluate_codec(codec: MimiCodec, bank: AudioBank, count: int, max_seconds: float, asr: Any = None,
                   batch: int = 16, by_speaker: bool = False) -> dict[str, Any]:
    """Held-out resynthesis of the first `count` utterances of `bank` (cut to `max_seconds`), encoded and decoded
    in padded batches of `batch`.

    Returns floats: mean mel distance and SI-SNR (dB); `f0_rel_error`, the median over utterances of each one's
    median relative F0 error on the frames voiced in both (`csm_jax.evaluation.f0_error`); `f0_unscored`, how
    many utterances had no such frame (they drop out of that median: a rendering that loses voicing must not pass
    for one that keeps pitch); `f0_gross_error` (mean fraction of those frames off by > 20 %) and
    `voicing_agreement`; the word error rates of the original and the resynthesis when `asr` (an
    `Intelligibility`) is given. With `by_speaker`, also "speakers": {speaker id (str): {"utterances", "f0_hz"
    (median over its utterances of each reference's median F0), "f0_rel_error", "f0_unscored",
    "voicing_agreement"}}, ordered by F0."""
    from csm_jax.evaluation import f0_error, mel_distance, si_snr

    n = min(count, len(bank))
    limit = int(max_seconds * bank.sample_rate)
    refs = [bank.utterance(i)[:limit] for i in range(n)]
    ests: list[np.ndarray] = []
    for start in range(0, n, batch):
        chunk = refs[start: start + batch]
        padded = np.zeros((len(chunk), codec.num_frames(max(len(r) for r in chunk)) * codec.frame_size), np.float32)
        for i, r in enumerate(chunk):
            padded[i, : len(r)] = r
        recon = np.asarray(codec.decode(codec.encode(padded)))
        ests += [recon[i, : len(r)] for i, r in enumerate(chunk)]
    sr = bank.sample_rate
    f0 = [f0_error(r, e, sr) for r, e in zip(refs, ests)]
    out: dict[str, Any] = {"mel_distance": float(np.mean([mel_distance(r, e, sr) for r, e in zip(refs, ests)])),
                           "si_snr": float(np.mean([si_snr(r, e) for r, e in zip(refs, ests)]))}
    out |= _f0_summary(f0)
    if asr is not None:
        texts = [bank.texts[i] for i in range(n)]
        full = [bank.utterance(i) for i in range(n)]
        if limit < max(len(a) for a in full):
            raise ValueError("word error rates need whole utterances: raise eval_max_seconds")
        out["wer_original"] = asr.wer(refs, texts, sr)
        out["wer_resynthesis"] = asr.wer(ests, texts, sr)
    if by_speaker:
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(int(bank.speakers[i]), []).append(i)
        rows = {}
        for spk, idx in groups.items():
            pitch = [f0[i]["ref_f0_hz"] for i in idx if not np.isnan(f0[i]["ref_f0_hz"])]
            summary = _f0_summary([f0[i] for i in idx])
            rows[spk] = {"utterances": len(idx), "f0_hz": float(np.median(pitch)) if pitch else float("nan"),
                         "f0_rel_error": summary["f0_rel_error"], "f0_unscored": summary["f0_unscored"],
                         "voicing_agreement": summary["voicing_agreement"]}
        out["speakers"] = {str(k): rows[k] for k in sorted(rows, key=lambda k: (np.nan_to_num(rows[k]["f0_hz"]), k))}
    return out


def _f0_summary(f0: list[dict[str, float]]) -> dict[str, float]:
    """`f0_error` results of several utterances -> f0_rel_error, f0_unscored, f0_gross_error, voicing_agreement."""
    scored = [m for m in f0 if m["voiced_frames"] > 0]
    return {"f0_rel_error": float(np.median([m["median_rel_error"] for m in scored])) if scored else float("nan"),
            "f0_unscored": float(len(f0) - len(scored)),
            "f0_gross_error": float(np.mean([m["gross_error_rate"] for m in scored])) if scored else float("nan"),
            "voicing_agreement": float(np.mean([m["voicing_agreement"] for m in f0]))}


def start_from(program: CodecProgram, state: CodecState, init: str | Path) -> CodecState:
    """A new run's first state from `init`: a codec training run's directory (the weights, codebooks and
    discriminator of its latest checkpoint; its codec, discriminator and distillation settings must be this
    run's) or anything `load_codec` reads (weights and codebooks; the discriminator starts from scratch)."""
    checkpoints = Path(init) / "checkpoints"
    if not checkpoints.is_dir():
        from csm_jax.codec.codec import load_codec

        return program.start_from(state, load_codec(init))
    with Checkpointer(checkpoints, async_save=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"codec_train.init: no checkpoint in {checkpoints}")
        meta = ckpt.meta(step)
        keys = ("discriminator", "distill")
        now = {"codec": program.codec_cfg.to_dict()} | {k: program.cfg.to_dict()[k] for k in keys}
        saved_cfg = {"codec": meta["codec_config"]} | {k: meta["config"][k] for k in keys}
        changes = _diff(saved_cfg, now)
        if changes:
            raise ConfigMismatch(f"codec_train.init: the run in {init} has other settings:\n  " + "\n  ".join(changes))
        saved, _ = ckpt.restore(program.abstract_state_sharded(), step)
    return program.continue_from(state, saved)


def _window_mean(window: list[dict[str, Any]]) -> dict[str, Any]:
    host = jax.device_get(window)
    return {k: np.mean([np.asarray(m[k], np.float64) for m in host if k in m], axis=0)
            for k in dict.fromkeys(k for m in host for k in m)}


def train_codec(cfg: CodecTrainConfig, codec_cfg: MimiConfig, train_bank: AudioBank,
                eval_bank: AudioBank | None = None, workdir: str | Path = "codec_run", asr: Any = None,
                ) -> dict[str, Any]:
    """Train to `cfg.max_steps`, resuming from `<workdir>/checkpoints`. Returns a summary: step, start_step,
    resumed, train (last logged metrics), eval (last eval), best_step, elapsed_s, workdir."""
    maybe_initialize_distributed(cfg.distributed)
    if train_bank.sample_rate != codec_cfg.sample_rate:
        raise ValueError(f"audio prepared at {train_bank.sample_rate} Hz, codec runs at {codec_cfg.sample_rate} Hz")
    workdir = Path(workdir).absolute()
    program = CodecProgram(codec_cfg, cfg, make_train_mesh(cfg.mesh))
    teacher = load_teacher(cfg.distill.teacher) if cfg.distill.teacher else None
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.max_to_keep, keep_best=cfg.keep_best,
                                best_metric="eval/mel_distance", async_save=cfg.async_checkpointing)
    writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard)
    t0 = time.time()
    summary: dict[str, Any] = {"workdir": str(workdir), "train": None, "eval": None}
    bar = None
    try:
        latest = checkpointer.latest_step() if cfg.resume else None
        if latest is not None:
            meta = checkpointer.meta(latest)
            check_resume(meta, cfg, codec_cfg)
            state, _ = checkpointer.restore(program.abstract_state_sharded(), latest)
            log.info("resumed from step %d (%s)", latest, checkpointer.directory)
        else:
            state = program.init_state(cfg.seed)
            if cfg.init:
                state = start_from(program, state, cfg.init)
                log.info("started from %s", cfg.init)
        step = int(jax.device_get(state.step))
        summary.update(start_step=step, resumed=latest is not None)
        log.info("codec parameters: %d; discriminator: %d", _count(state.params), _count(state.disc_params))
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train codec", dynamic_ncols=True,
                   disable=not (cfg.progress and jax.process_index() == 0))
        window: list[dict[str, Any]] = []
        window_start = time.time()
        while step < cfg.max_steps:
            audio = train_bank.crops(step, cfg.batch_size, program.segment, cfg.seed)
            feats = teacher(audio, codec_cfg.sample_rate) if teacher else None
            f0 = f0_batch(audio, codec_cfg.sample_rate) if cfg.weights["pitch"] else None
            state, metrics = program.train_step(state, step, audio, feats, f0)
            step += 1
            window.append(metrics)
            bar.update(1)
            last = step == cfg.max_steps
            if (cfg.log_every and step % cfg.log_every == 0) or last:
                means = _window_mean(window) | {"steps_per_s": len(window) / max(time.time() - window_start, 1e-9)}
                summary["train"] = writer.write(step, means, prefix="train/")
                bar.set_postfix(loss=f"{float(means['loss']):.3f}", mel=f"{float(means.get('mel', 0)):.3f}",
                                refresh=False)
                log.info("step %d: loss %.4f mel %.4f commit %.4f, %.2f steps/s", step, means["loss"],
                         means.get("mel", 0.0), means["commit"], means["steps_per_s"])
                window, window_start = [], time.time()
            eval_flat = None
            if eval_bank is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                result = evaluate_codec(program.codec(state), eval_bank, cfg.eval_utterances, cfg.eval_max_seconds,
                                        asr if cfg.eval_asr else None)
                eval_flat = writer.write(step, result, prefix="eval/")
                summary["eval"] = eval_flat
                log.info("step %d: eval %s", step, {k: round(v, 4) for k, v in result.items()})
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last or eval_flat is not None:
                meta = {"step": step, "config": cfg.to_dict(), "codec_config": codec_cfg.to_dict(),
                        "train": summary["train"], "eval": eval_flat}
                checkpointer.save(step, state, meta, eval_flat)
        summary["step"] = step
        checkpointer.wait()
        summary["best_step"] = checkpointer.best_step()
    finally:
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()
    summary["elapsed_s"] = time.time() - t0
    return summary


def restore_codec(workdir: str | Path, codec_cfg: MimiConfig, cfg: CodecTrainConfig, which: str | int = "best"
                  ) -> tuple[CodecState, CodecProgram, int]:
    """(state, program, step) of a run's checkpoint: "best" (lowest held-out mel distance), "latest", or a step."""
    program = CodecProgram(codec_cfg, cfg, make_train_mesh(cfg.mesh))
    with Checkpointer(Path(workdir) / "checkpoints", async_save=False, best_metric="eval/mel_distance") as ckpt:
        if which == "best":
            step = ckpt.best_step() if ckpt.best_step() is not None else ckpt.latest_step()
        else:
            step = ckpt.latest_step() if which == "latest" else int(which)
        if step is None:
            raise FileNotFoundError(f"no codec checkpoint in {workdir}/checkpoints")
        state, _ = ckpt.restore(program.abstract_state_sharded(), int(step))
    return state, program, int(step)


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
