"""Command line for the Mimi codec.

    python -m csm_jax.codec encode speech.wav speech.codes.npz --checkpoint CKPT [--num-codebooks 32]
    python -m csm_jax.codec decode speech.codes.npz speech.decoded.wav --checkpoint CKPT
    python -m csm_jax.codec roundtrip speech.wav speech.mimi.wav --checkpoint CKPT
    python -m csm_jax.codec convert SRC DST_DIR     # transformers dir / moshi .safetensors -> orbax dir
    python -m csm_jax.codec export CKPT DST_DIR     # any codec checkpoint -> transformers Mimi dir

CKPT is anything `csm_jax.load_codec` reads (hub ids such as kyutai/mimi included), or `random` for seeded
random weights (a smoke test of the pipeline; the audio is not speech). It defaults to $CSM_JAX_MIMI. A codes file
is an `.npz` with `codes` int16 [K, T], `sample_rate`, `frame_rate` and `num_samples` (the input length, used to
trim decoding).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from csm_jax.audio import AudioError, load_audio
from csm_jax.checkpoint import CheckpointError
from csm_jax.codec.codec import MimiCodec, load_codec
from csm_jax.codec.export import export_transformers


def _codec(args: argparse.Namespace) -> MimiCodec:
    ckpt = args.checkpoint or os.environ.get("CSM_JAX_MIMI")
    if not ckpt:
        raise CheckpointError(
            "no codec checkpoint: pass --checkpoint or set CSM_JAX_MIMI to a transformers Mimi directory "
            "or hub id (e.g. kyutai/mimi), a moshi tokenizer-*.safetensors file, or a converted directory"
        )
    num_codebooks = getattr(args, "num_codebooks", None)
    if ckpt == "random":
        print("warning: random codec weights; the output is not speech", file=sys.stderr)
        return MimiCodec.random(num_codebooks=num_codebooks)
    return load_codec(ckpt, num_codebooks=num_codebooks)


def _encode(codec: MimiCodec, wav: Path) -> tuple[np.ndarray, int]:
    audio = load_audio(wav, sample_rate=codec.sample_rate)
    return np.asarray(codec.encode(audio[None]))[0], len(audio)


def _write_codes(path: Path, codes: np.ndarray, codec: MimiCodec, num_samples: int) -> None:
    with open(path, "wb") as f:  # a handle, so numpy does not append ".npz" to the name
        np.savez(f, codes=codes.astype(np.int16), sample_rate=codec.sample_rate, frame_rate=codec.frame_rate,
                 num_samples=num_samples)


def _read_codes(path: Path) -> tuple[np.ndarray, int | None]:
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as f:
            codes, n = f["codes"], int(f["num_samples"]) if "num_samples" in f else None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path} is not a codes file written by `encode`: {e}") from e
    if codes.ndim != 2:
        raise ValueError(f"{path}: codes must be [K, T], got shape {list(codes.shape)}")
    return codes, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_jax.codec", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, a, b in (("encode", "audio", "codes"), ("decode", "codes", "audio"), ("roundtrip", "audio", "audio")):
        p = sub.add_parser(name)
        p.add_argument("input", type=Path, help=f"input {a} file")
        p.add_argument("output", type=Path, help=f"output {b} file")
        p.add_argument("--checkpoint", help="codec checkpoint, a path or hub id (default: $CSM_JAX_MIMI)")
        if name != "decode":
            p.add_argument("--num-codebooks", type=int, default=None, help="RVQ codebooks to use (default: all)")
    p = sub.add_parser("convert", help="write a converted orbax checkpoint")
    p.add_argument("input", type=Path, help="transformers Mimi dir or hub id, or moshi .safetensors file")
    p.add_argument("output", type=Path, help="new directory")
    p = sub.add_parser("export", help="write a transformers Mimi directory (MimiModel.from_pretrained reads it)")
    p.add_argument("input", type=Path, help="codec checkpoint: anything load_codec reads")
    p.add_argument("output", type=Path, help="new directory")
    args = parser.parse_args(argv)
    try:
        if not args.output.absolute().parent.is_dir():
            raise ValueError(f"cannot write {args.output}: directory {args.output.absolute().parent} does not exist")
        if args.command == "convert":
            out = load_codec(args.input).save(args.output)
            print(f"wrote {out}")
            return 0
        if args.command == "export":
            out = export_transformers(load_codec(args.input), args.output)
            print(f"wrote {out}")
            return 0
        codec = _codec(args)
        if args.command == "encode":
            codes, n = _encode(codec, args.input)
            _write_codes(args.output, codes, codec, n)
            print(f"{args.input}: {n / codec.sample_rate:.2f} s -> codes {list(codes.shape)} in {args.output}")
            return 0
        if args.command == "decode":
            codes, n = _read_codes(args.input)
        else:
            codes, n = _encode(codec, args.input)
        audio = np.asarray(codec.decode(codes[None]))[0][:n]
        sf.write(args.output, audio, codec.sample_rate, subtype="PCM_16")
        print(f"codes {list(codes.shape)} -> {len(audio) / codec.sample_rate:.2f} s in {args.output}")
        return 0
    except (AudioError, CheckpointError, ValueError, TypeError, OSError, sf.SoundFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
