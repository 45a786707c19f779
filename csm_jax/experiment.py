"""Recipes behind the `train/` entry points, callable from notebooks with the same (resolved Hydra) config dict:
make an espeak-ng corpus, prepare it into Mimi codes, train, and evaluate a checkpoint.

    cfg = {"model": {...}, "codec": {...}, "data": {...}, "optim": {...}, "train": {...}, "workdir": ...}
    make_corpus(cfg); prepare_data(cfg); run_training(cfg); run_evaluation(cfg)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import soundfile as sf
from tokenizers import Tokenizer

from csm_jax.codec.codec import MimiCodec, load_codec
from csm_jax.codec.config import MimiConfig
from csm_jax.configs import from_dict
from csm_jax.csm.config import CsmConfig
from csm_jax.csm.generator import Generator
from csm_jax.csm.prompt import PromptFormat
from csm_jax.csm.sampling import Sampling
from csm_jax.csm.weights import HUB_FILES
from csm_jax.data import Dataset, Loader, make_espeak_corpus, prepare, split
from csm_jax.data.speech_corpus import make_speech_corpus
from csm_jax.default_model import byte_tokenizer
from csm_jax.hub import checkpoint_path
from csm_jax.training import Checkpointer, LossConfig, TrainConfig, TrainProgram, evaluate, initial_params, train

log = logging.getLogger(__name__)
TOP_KEYS = {"model", "codec", "data", "optim", "train", "mesh", "distributed", "evaluate", "export", "paths",
            "workdir", "seed"}


def check_keys(cfg: dict[str, Any]) -> None:
    """Unknown top-level keys are errors (nested keys are checked where they are used)."""
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(TOP_KEYS)}")


# building blocks ---------------------------------------------------------------------------------------------
def model_config(cfg: dict[str, Any]) -> CsmConfig:
    m = cfg["model"]
    return CsmConfig.from_dict({**m["config"], "dtype": m.get("dtype") or "float32"})


def sampling(cfg: dict[str, Any]) -> Sampling:
    """`model.sampling`: the model's default sampling settings (`csm_jax.csm.sampling.Sampling` fields; absent:
    the CSM reference's; `temperature` / `top_k` alone apply to every codebook, as `Sampling.override`). Generators
    of the run use it and export writes it as `generation_config.json`."""
    given = dict(cfg["model"].get("sampling") or {})
    from_dict(Sampling, given, "model.sampling.")  # unknown keys and bad values are errors
    return Sampling().override(**given)


def tokenizer(cfg: dict[str, Any]) -> Tokenizer:
    """`model.tokenizer`: "byte" (built-in byte-level), a tokenizer.json path, or null (next to `model.init`, a path
    or hub id)."""
    m = cfg["model"]
    spec = m.get("tokenizer")
    if spec == "byte":
        return byte_tokenizer()
    path = Path(spec) if spec else (checkpoint_path(m["init"], HUB_FILES) / "tokenizer.json" if m.get("init") else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no tokenizer: set model.tokenizer to 'byte' or a tokenizer.json path (got {spec!r})")
    return Tokenizer.from_file(str(path))


def prompt_format(cfg: dict[str, Any]) -> PromptFormat:
    """The model's conversation format: its tokenizer, `model.frontend` and codebooks, with the context turn limit
    of `data.loader.context_turns`."""
    mc = model_config(cfg)
    return PromptFormat(tokenizer(cfg), mc.num_codebooks, mc.audio_vocab_size, cfg["model"].get("frontend"),
                        int(cfg["data"]["loader"]["context_turns"]))


def codec(cfg: dict[str, Any]) -> MimiCodec:
    """`codec.path` (any Mimi checkpoint), the codec bundled with `model.init`, or seeded random weights of the
    `codec.config` architecture."""
    c = cfg["codec"]
    if c.get("path"):
        return load_codec(c["path"])
    if c.get("random_seed") is not None:
        return MimiCodec.random(MimiConfig.from_dict(dict(c["config"])), seed=int(c["random_seed"]))
    if cfg["model"].get("init"):
        return load_codec(cfg["model"]["init"])
    raise ValueError("no codec: set codec.path, codec.random_seed, or model.init with bundled codec weights")


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    t = dict(cfg["train"])
    t.update(optim=cfg["optim"], mesh=cfg.get("mesh", {}), distributed=cfg.get("distributed", {}),
             seed=cfg.get("seed", t.get("seed", 0)), init_from=cfg["model"].get("init"))
    return from_dict(TrainConfig, t)


def datasets(cfg: dict[str, Any]) -> tuple[Dataset, Dataset]:
    d = cfg["data"]
    return split(Dataset.open(d["prepared"]), eval_conversations=int(d["eval_conversations"]),
                 seed=int(cfg.get("seed", 0)))


def loader(cfg: dict[str, Any], dataset: Dataset, fmt: PromptFormat, training: bool) -> Loader:
    """The `data.loader` Loader: shuffled for training; in dataset order, scoring only each example's last turn
    of its full context, for held-out evaluation (so eval losses compare across `target_turns` and
    `prompt_examples` settings)."""
    mc, opts = model_config(cfg), dict(cfg["data"]["loader"])
    unknown = set(opts) - {"batch_size", "max_rows", "context_turns", "seed", "buckets", "group_batches",
                           "target_turns", "prompt_examples"}
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted('data.loader.' + k for k in unknown)}")
    if opts["max_rows"] > mc.backbone.max_seq_len:
        raise ValueError(f"data.loader.max_rows={opts['max_rows']} exceeds the model's context "
                         f"({mc.backbone.max_seq_len})")
    opts.pop("context_turns")  # part of the prompt format
    if not training:
        opts["target_turns"], opts["prompt_examples"] = "last", False
    return Loader(dataset, fmt, shuffle=training, drop_last=False, **opts)


class Endless:
    """A Loader as the trainer's endless batch stream (epoch after epoch), with its exact-resume state."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self) -> "Endless":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.loader.next_batch()

    def state(self) -> dict[str, Any]:
        return self.loader.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.loader.restore(state)


# recipes -----------------------------------------------------------------------------------------------------
def make_corpus(cfg: dict[str, Any]) -> Path:
    """The corpus of `data.corpus` written next to `data.manifest`: `recipe` "espeak" (the default: espeak-ng only,
    `make_espeak_corpus`) or "speech" (every offline synthesiser, `make_speech_corpus`); its other keys are the
    recipe's arguments."""
    corpus = dict(cfg["data"].get("corpus") or {})
    if not corpus:
        raise ValueError(f"data '{cfg['data'].get('name')}' has no corpus recipe (data.corpus is null)")
    recipes = {"espeak": make_espeak_corpus, "speech": make_speech_corpus}
    recipe = corpus.pop("recipe", "espeak")
    if recipe not in recipes:
        raise ValueError(f"unknown data.corpus.recipe {recipe!r}; known: {sorted(recipes)}")
    return recipes[recipe](Path(cfg["data"]["manifest"]).parent, **corpus)


def prepare_data(cfg: dict[str, Any]) -> Any:
    """Manifest -> Mimi codes + text tokens in `data.prepared` (resumable)."""
    mc, d = model_config(cfg), cfg["data"]
    return prepare(d["manifest"], d["prepared"], codec(cfg), prompt_format(cfg), mc.num_codebooks,
                   audio_vocab_size=mc.audio_vocab_size, shard_size=int(d["shard_size"]),
                   speakers=d.get("speakers", "manifest"))


def run_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming from `workdir` when it holds checkpoints) on the prepared data; returns the summary."""
    check_keys(cfg)
    mc, tc, fmt = model_config(cfg), train_config(cfg), prompt_format(cfg)
    train_set, eval_set = datasets(cfg)
    eval_loader = None if not tc.eval_every else (lambda: loader(cfg, eval_set, fmt, training=False))
    workdir = Path(cfg["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    params = (lambda: recoded_init(cfg, train_set)) if cfg["model"].get("recode_from") else None
    return train(tc, mc, Endless(loader(cfg, train_set, fmt, training=True)), eval_loader, workdir, params=params)


def recoded_init(cfg: dict[str, Any], train_set: Dataset) -> Any:
    """`model.init`'s parameters carried over to this run's codes (`csm_jax.csm.recode`): its audio rows
    re-initialised from how the codes of `model.recode_from` (the same corpus prepared with the codec `init` was
    trained on) and of `data.prepared` coincide on the training utterances. `run_training` calls it only when
    the run starts (a resumed run restores its checkpoint)."""
    from csm_jax.csm.recode import code_cooccurrence, recode_params

    m, mc = cfg["model"], model_config(cfg)
    if not m.get("init"):
        raise ValueError("model.recode_from needs model.init: the model to carry over to the new codes")
    counts = code_cooccurrence(Dataset.open(m["recode_from"]), train_set, mc.num_codebooks)
    log.info("model.init's audio vocabulary recoded from %s (%d frames)", m["recode_from"], int(counts[0].sum()))
    return recode_params(initial_params(m["init"], mc), counts)


def restore_params(cfg: dict[str, Any], which: str | int = "best") -> tuple[Any, int]:
    """Parameters of the `workdir` checkpoint `which` ("best", "latest" or a step) -> (params, step)."""
    mc, tc = model_config(cfg), train_config(cfg)
    program = TrainProgram(mc, tc.loss, tc.optim, total_steps=tc.max_steps)
    with Checkpointer(Path(cfg["workdir"]) / "checkpoints") as ckpt:
        step = {"best": ckpt.best_step() or ckpt.latest_step(), "latest": ckpt.latest_step()}.get(which, which)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {cfg['workdir']}/checkpoints: train first")
        state, _ = ckpt.restore(program.abstract_state, step=int(step))
    return jax.device_get(state.params), int(step)


def run_evaluation(cfg: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss per codebook (every target frame through the depth decoder), generated samples as wavs next
    to the codec's resynthesis of the real turn, and optionally their intelligibility; writes eval/step_N/."""
    check_keys(cfg)
    e = cfg["evaluate"]
    mc, tc, fmt, mimi = model_config(cfg), train_config(cfg), prompt_format(cfg), codec(cfg)
    params, step = restore_params(cfg, e.get("checkpoint", "best"))
    _, eval_set = datasets(cfg)
    full = LossConfig(depth_fraction=1.0)
    program = TrainProgram(mc, full, tc.optim, total_steps=tc.max_steps)
    metrics = evaluate(program, params, lambda: loader(cfg, eval_set, fmt, training=False), e.get("eval_batches"), full)
    out = Path(cfg["workdir"]) / "eval" / f"step_{step}"
    out.mkdir(parents=True, exist_ok=True)
    gen = Generator(params, mc, mimi, fmt.tokenizer, frontend=fmt.frontend, max_context_turns=fmt.max_context_turns,
                    sampling=sampling(cfg))
    samples, texts, real = [], [], []
    for i in range(min(int(e["samples"]), len(eval_set))):
        entry = eval_set[i]
        earlier = [j for j in range(len(eval_set)) if eval_set[j].conversation == entry.conversation
                   and eval_set[j].turn < entry.turn]
        max_frames = max(1, int(e["max_audio_ms"]) // 80)
        target = fmt.text_ids(entry.text, entry.speaker)
        history = [(fmt.text_ids(eval_set[j].text, eval_set[j].speaker), eval_set.codes(j).astype(np.int32))
                   for j in earlier]
        budget = mc.backbone.max_seq_len - max_frames - len(target)
        (tokens, mask), _, _ = fmt.conversation_rows(history, target, budget)
        codes = gen.generate_codes(tokens, mask, max_frames=max_frames,
                                   temperature=e.get("temperature"), top_k=e.get("top_k"),
                                   seed=int(e.get("seed", 0)) + i, code_limit=mimi.config.codebook_size)
        audio = np.asarray(mimi.decode(codes.T[None]))[0] if len(codes) else np.zeros(0, np.float32)
        resynth = np.asarray(mimi.decode(eval_set.codes(i).T[None].astype(np.int32)))[0]
        sf.write(out / f"sample_{i}.wav", audio, mimi.sample_rate)
        sf.write(out / f"real_{i}.wav", resynth, mimi.sample_rate)
        samples.append(audio)
        real.append(resynth)
        texts.append(entry.text)
    result: dict[str, Any] = {"step": step, "loss": _floats(metrics), "samples": len(samples), "dir": str(out)}
    if e.get("intelligibility") and samples:
        from csm_jax.evaluation import Intelligibility

        corpus = [eval_set[j].text for j in range(len(eval_set))]
        asr = Intelligibility(corpus)
        result["wer_generated"] = asr.wer([a if a.size else np.zeros(1920, np.float32) for a in samples], texts)
        result["wer_codec_resynthesis"] = asr.wer(real, texts)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def trained_generator(cfg: dict[str, Any], which: str | int = "best") -> tuple[Generator, int]:
    """The run's checkpoint `which` with its codec and prompt format, ready to speak -> (generator, step)."""
    mc, fmt = model_config(cfg), prompt_format(cfg)
    params, step = restore_params(cfg, which)
    return Generator(params, mc, codec(cfg), fmt.tokenizer, frontend=fmt.frontend,
                     max_context_turns=fmt.max_context_turns, sampling=sampling(cfg)), step


def run_voice_evaluation(cfg: dict[str, Any]) -> dict[str, Any]:
    """`csm_jax.evaluation.voice.evaluate_voice` of the run's checkpoint `evaluate.checkpoint` (or of the exported
    model `evaluate.model`, any `load_csm` path) on the corpus's held-out sentences and conversations; writes
    wavs and voice_eval.json to <workdir>/eval/voice_<step or model name>/."""
    from csm_jax.csm.generator import load_csm
    from csm_jax.data.loader import held_out_conversations
    from csm_jax.data.manifest import read_manifest
    from csm_jax.evaluation.voice import VoiceEvalConfig, evaluate_voice

    check_keys(cfg)
    e = cfg["evaluate"]
    if e.get("model"):
        gen, tag = load_csm(e["model"]), Path(e["model"]).name
    else:
        gen, step = trained_generator(cfg, e.get("checkpoint", "best"))
        tag = f"step_{step}"
    manifest = Path(cfg["data"]["manifest"])
    heldout = manifest.parent / "heldout.txt"
    if not heldout.is_file():
        raise FileNotFoundError(f"{heldout}: the voice evaluation needs the speech corpus's held-out sentences")
    utterances = read_manifest(manifest)
    held = held_out_conversations({u.conversation for u in utterances}, int(cfg["data"]["eval_conversations"]),
                                  int(cfg.get("seed", 0)))
    sentences = [line.strip() for line in heldout.read_text().splitlines() if line.strip()]
    result = evaluate_voice(gen, sentences, [u for u in utterances if u.conversation in held],
                            [u.text for u in utterances if u.conversation not in held],
                            from_dict(VoiceEvalConfig, dict(e.get("voice") or {}), "evaluate.voice."),
                            Path(cfg["workdir"]) / "eval" / f"voice_{tag}")
    return {k: v for k, v in result.items() if k != "items"} | {"model": tag}


def run_export(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's checkpoint `export.checkpoint` with its codec, tokenizer and prompt settings -> `export.dir`, a
    transformers CSM directory (`load_csm` and `CsmForConditionalGeneration.from_pretrained` read it) with weights
    in `export.dtype`; `prompt.json` records the text front end and context rule the model was trained with,
    `generation_config.json` its sampling settings (`model.sampling`)."""
    from csm_jax.csm.export import export_transformers
    from csm_jax.csm.prompt import PROMPT_FILE

    check_keys(cfg)
    x = cfg["export"]
    gen, step = trained_generator(cfg, x.get("checkpoint", "best"))
    fmt = gen.prompt_format()
    out = export_transformers(gen.params, gen.cfg, x["dir"], codec=gen.codec, tokenizer=fmt.tokenizer,
                              dtype=x.get("dtype", "float32"),
                              sampling=gen.sampling,
                              extra_files={PROMPT_FILE: json.dumps(fmt.settings(), indent=2) + "\n",
                                           "STEP": f"{step}\n"})
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    return {"export": str(out), "step": step, "bytes": size}


def _floats(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (np.asarray(v).tolist()) for k, v in metrics.items()}
