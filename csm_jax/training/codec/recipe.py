"""The codec training recipe behind `train/train_codec.py`, callable from notebooks with the same resolved config:

    cfg = {"codec": {"config": {...}}, "data": {"manifest": ...}, "codec_train": {...}, "codec_audio": ...,
           "workdir": ..., "export": ...}
    run_codec_training(cfg)      # prepare audio (once), train (resuming), export the best checkpoint
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from csm_jax.codec.config import MimiConfig
from csm_jax.configs import from_dict
from csm_jax.data.manifest import read_manifest
from csm_jax.training.codec.config import CodecTrainConfig
from csm_jax.training.codec.data import AudioBank, prepare_audio
from csm_jax.training.codec.rvq import HALVES
from csm_jax.training.codec.trainer import restore_codec, train_codec

log = logging.getLogger(__name__)
TOP_KEYS = {"codec", "data", "codec_train", "codec_audio", "workdir", "export", "export_checkpoint", "mesh",
            "distributed", "paths", "seed"}


def codec_config(cfg: dict[str, Any]) -> MimiConfig:
    """`codec.config` as a MimiConfig; its strides must make whole codec frames."""
    arch = cfg["codec"].get("config")
    if not arch:
        raise ValueError(f"codec '{cfg['codec'].get('name')}' has no architecture to train (codec.config is null)")
    try:
        mc = MimiConfig.from_dict(dict(arch))
        mc.frame_size  # noqa: B018  (raises when the encoder rate is not a multiple of the frame rate)
    except (TypeError, ValueError) as e:
        raise ValueError(f"codec.config: {e}") from e
    return mc


def train_config(cfg: dict[str, Any]) -> CodecTrainConfig:
    t = dict(cfg["codec_train"])
    t.update(seed=cfg.get("seed", 0), mesh=cfg.get("mesh", {}), distributed=cfg.get("distributed", {}))
    return from_dict(CodecTrainConfig, t, "codec_train.")


def _check_keys(cfg: dict[str, Any]) -> None:
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(TOP_KEYS)}")


def run_codec_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """Prepare `data.manifest` into `codec_audio`, train in `workdir`, export the best checkpoint to `export`."""
    _check_keys(cfg)
    mc, tc = codec_config(cfg), train_config(cfg)
    manifest = Path(cfg["data"]["manifest"])
    audio_dir = prepare_audio(manifest, cfg["codec_audio"], eval_conversations=int(cfg["data"]["eval_conversations"]),
                              seed=int(cfg.get("seed", 0)), sample_rate=mc.sample_rate, progress=tc.progress)
    train_bank, eval_bank = AudioBank.open(audio_dir, "train"), AudioBank.open(audio_dir, "eval")
    log.info("codec audio: %.2f h train, %.2f h held out", train_bank.hours, eval_bank.hours)
    asr = None
    if tc.eval_asr:
        from csm_jax.evaluation import Intelligibility

        asr = Intelligibility(u.text for u in read_manifest(manifest))
    summary = train_codec(tc, mc, train_bank, eval_bank, cfg["workdir"], asr)
    summary["export"] = str(export_codec(cfg, "best"))
    return summary


def export_checkpoint(cfg: dict[str, Any]) -> dict[str, Any]:
    """Export the run's checkpoint `export_checkpoint` ("best", "latest" or a step) -> {"export": dir, "step": n}."""
    _check_keys(cfg)
    out = export_codec(cfg, cfg.get("export_checkpoint") or "best")
    return {"export": str(out), "step": int((out / "STEP").read_text())}


def export_codec(cfg: dict[str, Any], which: str | int = "best") -> Path:
    """Checkpoint `which` of the run -> `<export>/codec` (converted, `load_codec` reads it) and
    `<export>/transformers` (`MimiModel.from_pretrained` reads it; EMA codebooks in their official form)."""
    from csm_jax.codec.export import export_transformers

    mc, tc = codec_config(cfg), train_config(cfg)
    state, program, step = restore_codec(cfg["workdir"], mc, tc, which)
    out = Path(cfg["export"])
    if out.exists():
        shutil.rmtree(out)
    codec = program.codec(state)
    codec.save(out / "codec")
    ema = {half: {k: state.ema[half][k] for k in ("embed_sum", "cluster_usage")} for half in HALVES}
    export_transformers(codec, out / "transformers", ema=ema)
    (out / "STEP").write_text(f"{step}\n")
    log.info("exported step %d to %s", step, out)
    return out
