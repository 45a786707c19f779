"""The codec training recipe behind `train/train_codec.py`, callable from notebooks with the same resolved config:

    cfg = {"codec": {"config": {...}}, "data": {"manifest": ...}, "codec_train": {...}, "codec_audio": ...,
           "workdir": ..., "export": ...}
    run_codec_training(cfg)      # prepare audio (once), train (resuming), export the best checkpoint
    evaluate_trained_codec(cfg)  # held-out resynthesis of the export (or of `codec.path`), per voice
"""

from __future__ import annotations

import json
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
from csm_jax.training.codec.trainer import evaluate_codec, restore_codec, train_codec

log = logging.getLogger(__name__)
TOP_KEYS = {"codec", "data", "codec_train", "codec_audio", "workdir", "export", "export_checkpoint", "mesh",
            "distributed", "paths", "seed", "evaluate_codec"}


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
    audio_dir = _prepared_audio(cfg, mc, tc.progress)
    train_bank, eval_bank = AudioBank.open(audio_dir, "train"), AudioBank.open(audio_dir, "eval")
    log.info("codec audio: %.2f h train, %.2f h held out", train_bank.hours, eval_bank.hours)
    summary = train_codec(tc, mc, train_bank, eval_bank, cfg["workdir"], _asr(cfg) if tc.eval_asr else None)
    summary["export"] = str(export_codec(cfg, "best"))
    return summary


def evaluate_trained_codec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Held-out resynthesis (`trainer.evaluate_codec`, per voice) of `codec.path` when set, else of the run's
    export (`<export>/codec`), on the corpus's held-out split as training prepared it. Settings under
    `evaluate_codec` (utterances, max_seconds, batch, asr, out: a JSON file also written there) -> the metrics with
    "codec" (what was evaluated) and "utterances"."""
    from csm_jax.codec.codec import load_codec

    _check_keys(cfg)
    ev = cfg["evaluate_codec"]
    path = Path(cfg["codec"].get("path") or Path(cfg["export"]) / "codec")
    if not path.exists():
        raise FileNotFoundError(f"no codec at {path}: set codec.path, or export the run first (train/export_codec.py)")
    codec = load_codec(path)
    bank = AudioBank.open(_prepared_audio(cfg, codec.config, progress=False), "eval")
    result = evaluate_codec(codec, bank, int(ev["utterances"]), float(ev["max_seconds"]),
                            _asr(cfg) if ev["asr"] else None, batch=int(ev["batch"]), by_speaker=True)
    result = {"codec": str(path), "utterances": min(int(ev["utterances"]), len(bank))} | result
    if ev.get("out"):
        Path(ev["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(ev["out"]).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _prepared_audio(cfg: dict[str, Any], mc: MimiConfig, progress: bool) -> Path:
    """The corpus resampled for the codec, split as training splits it (prepared once, then reused)."""
    return prepare_audio(Path(cfg["data"]["manifest"]), cfg["codec_audio"],
                         eval_conversations=int(cfg["data"]["eval_conversations"]), seed=int(cfg.get("seed", 0)),
                         sample_rate=mc.sample_rate, progress=progress)


def _asr(cfg: dict[str, Any]) -> Any:
    """The recogniser of the codec metrics, its language model from the corpus text."""
    from csm_jax.evaluation import Intelligibility

    return Intelligibility(u.text for u in read_manifest(Path(cfg["data"]["manifest"])))


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
