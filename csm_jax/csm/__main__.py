"""Command line for CSM.

    python -m csm_jax.csm generate [--checkpoint CKPT] --text "Hello there." --out hello.wav [--speaker 0]
        [--context speaker:transcript:path.wav ...] [--max-audio-ms 10000] [--temperature T] [--top-k K]
        [--depth-temperature T] [--depth-top-k K] [--seed 0] [--num-codebooks 32] [--voice NAME | --no-voice]
    python -m csm_jax.csm voice DIR NAME --turn "Its transcript.:ref.wav" [--turn ...]   # add a voice preset to DIR
    python -m csm_jax.csm convert SRC DST [--quantize int8|bf16]   # transformers / original checkpoint -> orbax
        dir (+ tokenizer, codec); --quantize int8 stores int8 projections and audio heads with per-channel scales,
        bf16 stores them in bfloat16 (computing in the checkpoint's dtype, codebook 0's head kept in it)
    python -m csm_jax.csm export SRC DST [--dtype float16] [--codec CODEC]   # any checkpoint -> transformers CSM
        dir (+ tokenizer.json, prompt.json, voice presets and the codec under codec_model. when SRC has them;
        generation_config.json); --codec bundles another codec that makes the same codes (a fine-tuned decoder)

CKPT and SRC are anything `csm_jax.load_csm` reads (hub ids such as sesame/csm-1b included); CKPT defaults to
$CSM_JAX_CSM, else the built-in default voice (`csm_jax.default_model`). Sampling left out is the model's
(`generation_config.json`, else 0.9 / top 50). A speaker with no audio in --context is prompted by the model's voice
preset `--voice` (`voices.json`; default "default" when the model has one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from csm_jax import backend, hub
from csm_jax.audio import AudioError, load_audio
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.codec import MimiCodec, load_codec
from csm_jax.csm.export import DTYPES, check_out_dir, export_transformers
from csm_jax.csm.generator import Segment, load_csm
from csm_jax.csm.prompt import PROMPT_FILE
from csm_jax.csm.quantize import MODES as QUANTIZE_MODES
from csm_jax.csm.quantize import quantize_params
from csm_jax.csm.voices import DEFAULT_VOICE, read_voices, save_voice
from csm_jax.csm.weights import HUB_FILES, load_csm_params, save_converted
from csm_jax.default_model import VOICE_DIR


def _turn(spec: str, form: str = "transcript:path.wav") -> tuple[str, np.ndarray]:
    """`transcript:path.wav` -> (transcript, its audio); the transcript may contain ':'."""
    text, _, wav = spec.rpartition(":")
    if not text or not wav:
        raise ValueError(f"expected {form}, got {spec!r}")
    return text, load_audio(wav)


def _segment(spec: str) -> Segment:
    """`speaker:transcript:path.wav` -> Segment."""
    speaker, _, rest = spec.partition(":")
    if not speaker.isdigit():
        raise ValueError(f"--context must be speaker:transcript:path.wav, got {spec!r}")
    return Segment(int(speaker), *_turn(rest, "--context speaker:transcript:path.wav"))


def _same_codes(codec: MimiCodec, trained_on: MimiCodec | None, name: str) -> MimiCodec:
    """`codec`, if it encodes as the codec the CSM was trained with (when that is known); else ValueError."""
    diffs = [] if trained_on is None else trained_on.code_differences(codec)
    if diffs:
        raise ValueError(f"the codec {name} makes other codes than the one the CSM was trained on (it differs in "
                         f"{', '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); only its decoder may change")
    return codec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_jax.csm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text (+ context) -> wav")
    g.add_argument("--checkpoint", help="CSM checkpoint, a path or hub id org/name[@revision] (default: "
                   "$CSM_JAX_CSM, else the built-in default voice)")
    g.add_argument("--text", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--speaker", type=int, default=0)
    g.add_argument("--context", action="append", default=[], help="speaker:transcript:path.wav (repeatable)")
    g.add_argument("--max-audio-ms", type=int, default=10_000)
    g.add_argument("--temperature", type=float, default=None, help="default: the model's (generation_config.json)")
    g.add_argument("--top-k", type=int, default=None, help="default: the model's; 1 is greedy")
    g.add_argument("--depth-temperature", type=float, default=None,
                   help="codebooks 1..K-1 (default: --temperature if given, else the model's)")
    g.add_argument("--depth-top-k", type=int, default=None, help="codebooks 1..K-1 (default: as --depth-temperature)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-codebooks", type=int, default=None)
    g.add_argument("--voice", default=DEFAULT_VOICE, help="the model's voice preset for a speaker with no audio in "
                   "--context (default: its default preset, if any)")
    g.add_argument("--no-voice", action="store_true", help="no voice preset")
    v = sub.add_parser("voice", help="add (or replace) a voice preset of a model directory")
    v.add_argument("model", type=Path, help="a local model directory")
    v.add_argument("name", help="the preset's name (\"default\" speaks when a request names none)")
    v.add_argument("--turn", action="append", required=True, help="transcript:path.wav, a recording of the voice "
                   "(repeatable: turns oldest first; at most 30 s in all)")
    c = sub.add_parser("convert", help="write a converted orbax checkpoint")
    c.add_argument("input", type=Path, help="CSM checkpoint: a path or a hub id org/name[@revision]")
    c.add_argument("output", type=Path)
    c.add_argument("--quantize", choices=list(QUANTIZE_MODES), default=None,
                   help="store the projections and audio heads weight-only quantised: int8 (per-output-channel "
                        "scales) or bf16; embeddings, norms and codebook 0's head stay in the checkpoint's dtype, "
                        "which the model computes in")
    e = sub.add_parser("export", help="write a transformers CSM directory (CsmForConditionalGeneration reads it)")
    e.add_argument("input", type=Path, help="CSM checkpoint: a path or a hub id org/name[@revision]")
    e.add_argument("output", type=Path)
    e.add_argument("--dtype", choices=list(DTYPES), default="float32", help="tensor dtype (default float32)")
    e.add_argument("--codec", help="bundle this codec (any `load_codec` path) instead of SRC's: one that makes the "
                   "same codes, e.g. SRC's with a fine-tuned decoder (train_codec.py codec_train=decoder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "voice":
            if not args.model.is_dir():
                raise ValueError(f"{args.model} is not a model directory")
            wavs = save_voice(args.model, args.name, [_turn(spec, "--turn transcript:path.wav") for spec in args.turn])
            print(f"wrote {', '.join(map(str, wavs))}; voices: {sorted(read_voices(args.model))}")
            return 0
        if args.command == "export":
            check_out_dir(args.output)  # before the (slow) load
            ckpt = hub.checkpoint_path(args.input, HUB_FILES)  # a hub id -> its cached snapshot
            gen = load_csm(ckpt)
            codec = gen.codec if args.codec is None else _same_codes(load_codec(args.codec), gen.codec, args.codec)
            src = ckpt if ckpt.is_dir() else ckpt.parent
            extra = {PROMPT_FILE: (src / PROMPT_FILE).read_text()} if (src / PROMPT_FILE).is_file() else {}
            out = export_transformers(gen.params, gen.cfg, args.output, codec=codec, tokenizer=gen.tokenizer,
                                      dtype=args.dtype, extra_files=extra, sampling=gen.sampling)
            for preset in gen.voices.values():
                save_voice(out, preset.name, preset.turns)
            print(f"wrote {out}")
            return 0
        if args.command == "convert":
            ckpt = hub.checkpoint_path(args.input, HUB_FILES)
            params, cfg = load_csm_params(ckpt)
            if args.quantize:  # computing in the checkpoint's dtype: the result is the same on any machine
                params, cfg = quantize_params(params, cfg, args.quantize, cfg.dtype)
            out = save_converted(args.output, params, cfg)
            src = ckpt if ckpt.is_dir() else ckpt.parent
            if (src / "tokenizer.json").is_file():
                shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
            gen = load_csm(ckpt)
            gen.sampling.save(out)
            if gen.codec is not None:
                gen.codec.save(out / "codec")
            for preset in gen.voices.values():
                save_voice(out, preset.name, preset.turns)
            print(f"wrote {out}")
            return 0
        ckpt = args.checkpoint or os.environ.get("CSM_JAX_CSM") or VOICE_DIR
        if not args.out.absolute().parent.is_dir():
            raise ValueError(f"cannot write {args.out}: directory {args.out.absolute().parent} does not exist")
        context = [_segment(spec) for spec in args.context]
        gen = load_csm(ckpt, num_codebooks=args.num_codebooks, dtype=backend.current().serving_dtype)
        audio = gen.generate(args.text, args.speaker, context, args.max_audio_ms, args.temperature, args.top_k,
                             args.seed, depth_temperature=args.depth_temperature, depth_top_k=args.depth_top_k,
                             voice=None if args.no_voice else args.voice)
        sf.write(args.out, audio, 24_000, subtype="PCM_16")
        print(f"{len(audio) / 24_000:.2f} s of audio -> {args.out}")
        return 0
    except (AudioError, CheckpointError, ValueError, TypeError, OSError, sf.SoundFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
