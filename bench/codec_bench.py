"""Mimi codec speed: transformers vs csm-jax, same full-size weights, same run, same speech input.

Run from the repository root:

    .venv/bin/python bench/codec_bench.py                  # defaults: --repeats 5 --frames 50 --batch 1
    .venv/bin/python bench/codec_bench.py --repeats 3 --json bench.json

A full-size transformers `MimiModel` with seeded random weights (codebooks randomised so codes are non-degenerate)
is saved with `save_pretrained`; transformers reloads it with `from_pretrained`, csm-jax with `load_codec`, from
the same files. Measured: offline encode and decode of 10 s of speech (min/median over --repeats, after warmup;
the first call, which includes JAX compilation, is reported apart), and per-frame (80 ms) streaming decode/encode
latency. transformers cannot stream-decode exactly, so its streaming comparator is a stateless single-frame
`decode(codes[..., i:i+1])` / `encode(1920 samples)` per frame. The two sides alternate (offline: call by call;
streaming: blocks of 10 consecutive frames), so background load hits both; still, run on an idle machine (the load
average is printed). Targets (2-core CPU):
>= 2x transformers on offline encode and decode, <= 20 ms median per streamed 80 ms frame.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import soundfile as sf
import torch
import transformers

import csm_jax
from bench_env import environment, print_environment, verdict

SPEECH = Path(__file__).resolve().parents[1] / "tests" / "data" / "speech_14s.wav"
SAMPLE_RATE = 24_000
SECONDS = 10
FRAME = 1920
FRAME_MS = 1000 * FRAME / SAMPLE_RATE
TARGET_SPEEDUP = 2.0
TARGET_FRAME_MS = 20.0


def build_checkpoint(path: Path, seed: int) -> None:
    """Full-size transformers Mimi with seeded random weights, written with `save_pretrained`."""
    torch.manual_seed(seed)
    model = transformers.MimiModel(transformers.MimiConfig())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buf.normal_()
            elif name.endswith("codebook.cluster_usage"):
                buf.uniform_(0.5, 2.0)
    model.save_pretrained(path)


def ms(fn: Callable[[], Any]) -> float:
    """Wall time of one call in ms; `fn` must return only once its result is ready."""
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def stats(times: list[float], **extra: float) -> dict[str, Any]:
    return {
        **extra,
        "min_ms": min(times),
        "median_ms": statistics.median(times),
        "p95_ms": float(np.percentile(times, 95)),
        "max_ms": max(times),
        "times_ms": times,
    }


def offline(hf_fn: Callable[[], Any], jax_fn: Callable[[], Any], repeats: int) -> tuple[dict, dict]:
    """First call of each (JAX: includes compilation), one warmup call each, then `repeats` interleaved rounds."""
    first = [ms(hf_fn), ms(jax_fn)]
    hf_fn(), jax_fn()
    times = [(ms(hf_fn), ms(jax_fn)) for _ in range(repeats)]
    return tuple(stats([t[side] for t in times], first_ms=first[side]) for side in (0, 1))


STREAM_BLOCK = 10


def streaming(hf_step: Callable[[int], Any], stream: Any, inputs: list[Any], frames: int) -> tuple[dict, dict]:
    """Per-frame latency over frames 0..frames-1. A stream runs its frames back to back, so each side runs
    blocks of STREAM_BLOCK consecutive frames, and the sides alternate block by block (shared load noise).

    csm-jax: first step (compile) and 3 warmup steps, then `reset()` so timing starts from a fresh stream.
    """
    jax_step = lambda i: stream.step(inputs[i]).block_until_ready()  # noqa: E731
    first = [ms(lambda: hf_step(0)), ms(lambda: jax_step(0))]
    for i in range(1, 4):
        jax_step(i)
    stream.reset()
    times: tuple[list[float], list[float]] = ([], [])
    for start in range(0, frames, STREAM_BLOCK):
        block = range(start, min(start + STREAM_BLOCK, frames))
        times[0].extend(ms(lambda: hf_step(i)) for i in block)
        times[1].extend(ms(lambda: jax_step(i)) for i in block)
    return tuple(stats(times[side], first_ms=first[side]) for side in (0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of each offline call (default 5)")
    ap.add_argument("--frames", type=int, default=50, help="frames timed per streaming run, 1..125 (default 50)")
    ap.add_argument("--batch", type=int, default=1, help="streams for the main streaming-decode row (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = ap.parse_args()
    n_frames = SECONDS * SAMPLE_RATE // FRAME
    if not 1 <= args.frames <= n_frames:
        ap.error(f"--frames must be in 1..{n_frames}")

    load = print_environment()
    transformers.utils.logging.disable_progress_bar()
    audio, sr = sf.read(SPEECH, dtype="float32")
    assert sr == SAMPLE_RATE and audio.ndim == 1, (sr, audio.shape)
    audio = audio[None, : SECONDS * SAMPLE_RATE]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_checkpoint(Path(tmp), args.seed)
        hf = transformers.MimiModel.from_pretrained(tmp).eval()
        codec = csm_jax.load_codec(tmp)
        print(f"full-size Mimi (seed {args.seed}, K={codec.num_codebooks}) built and loaded by both in "
              f"{time.perf_counter() - t0:.1f} s\n")
    assert next(hf.parameters()).dtype == torch.float32

    x_t = torch.from_numpy(audio)[:, None]
    frames_np = audio[0, : n_frames * FRAME].reshape(n_frames, 1, FRAME)
    r: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        codes_t = hf.encode(x_t).audio_codes
        codes = codes_t.numpy().astype(np.int32)
        assert codes.shape == (1, codec.num_codebooks, n_frames), codes.shape

        r["hf_encode"], r["jax_encode"] = offline(
            lambda: hf.encode(x_t).audio_codes, lambda: codec.encode(audio).block_until_ready(), args.repeats
        )
        r["hf_decode"], r["jax_decode"] = offline(
            lambda: hf.decode(codes_t).audio_values, lambda: codec.decode(codes).block_until_ready(), args.repeats
        )
        batches = [args.batch] + ([4] if args.batch != 4 else [])
        for b in batches:
            hcodes = [codes_t[..., i : i + 1].repeat(b, 1, 1) for i in range(n_frames)]
            jcodes = [np.repeat(codes[:, :, i], b, axis=0) for i in range(n_frames)]
            r[f"hf_stream_decode_b{b}"], r[f"jax_stream_decode_b{b}"] = streaming(
                lambda i: hf.decode(hcodes[i]).audio_values, codec.stream_decoder(b), jcodes, args.frames
            )
        hframes = [torch.from_numpy(f)[:, None] for f in frames_np]
        r["hf_stream_encode_b1"], r["jax_stream_encode_b1"] = streaming(
            lambda i: hf.encode(hframes[i]).audio_codes, codec.stream_encoder(1), list(frames_np), args.frames
        )

        jax_codes = np.asarray(codec.encode(audio))
        hf_audio = hf.decode(codes_t).audio_values[:, 0].numpy()
    jax_audio = np.asarray(codec.decode(codes))
    agree = {
        "codes_equal_semantic": float(np.mean(jax_codes[:, 0] == codes[:, 0])),
        "codes_equal_all": float(np.mean(jax_codes == codes)),
        "decode_max_abs_diff": float(np.max(np.abs(jax_audio - hf_audio))),
        "decode_rms": float(np.sqrt(np.mean(hf_audio**2))),
    }

    rows = [
        ("offline encode 10 s (B=1)", "encode"),
        (f"offline decode 10 s, {n_frames} frames (B=1)", "decode"),
        *[(f"stream decode / 80 ms frame (B={b}, per step)", f"stream_decode_b{b}") for b in batches],
        ("stream encode / 80 ms frame (B=1)", "stream_encode_b1"),
    ]
    speedup = {key: r[f"hf_{key}"]["median_ms"] / r[f"jax_{key}"]["median_ms"] for _, key in rows}
    w = max(len(label) for label, _ in rows)
    print(f"{'what':<{w}} | {'transformers min/median ms':>26} | {'csm-jax min/median ms':>22} | speedup")
    print("-" * (w + 64))
    for label, key in rows:
        h, j = r[f"hf_{key}"], r[f"jax_{key}"]
        print(f"{label:<{w}} | {h['min_ms']:12.1f} / {h['median_ms']:9.1f} | {j['min_ms']:9.1f} / "
              f"{j['median_ms']:9.1f} | {speedup[key]:6.2f}x")
    print(f"(speedup = transformers median / csm-jax median; transformers' streaming rows are stateless single-frame "
          f"calls; {args.repeats} offline repeats, {args.frames} streamed frames)\n")

    print("csm-jax streaming ms/frame   median     p95     max   first call (compile)")
    for _, key in rows[2:]:
        j = r[f"jax_{key}"]
        print(f"  {key:<26} {j['median_ms']:7.1f} {j['p95_ms']:7.1f} {j['max_ms']:7.1f}   {j['first_ms']:9.0f}")
    print(f"csm-jax first call (incl. compile): encode {r['jax_encode']['first_ms']:.0f} ms, "
          f"decode {r['jax_decode']['first_ms']:.0f} ms\n")

    audio_ms = 1000.0 * SECONDS
    print("real-time factor (compute time / audio time; lower is better):")
    for op in ("encode", "decode"):
        print(f"  offline {op}: transformers {r[f'hf_{op}']['median_ms'] / audio_ms:.3f}, "
              f"csm-jax {r[f'jax_{op}']['median_ms'] / audio_ms:.3f}")
    for _, key in rows[2:]:
        print(f"  {key}: transformers {r[f'hf_{key}']['median_ms'] / FRAME_MS:.3f}, "
              f"csm-jax {r[f'jax_{key}']['median_ms'] / FRAME_MS:.3f}")

    sd = r[f"jax_stream_decode_b{args.batch}"]
    targets = {
        "offline_encode_speedup": speedup["encode"] >= TARGET_SPEEDUP,
        "offline_decode_speedup": speedup["decode"] >= TARGET_SPEEDUP,
        "stream_decode_frame_ms": sd["median_ms"] <= TARGET_FRAME_MS,
    }
    print(f"\nsame-weights check: codes equal {agree['codes_equal_semantic']:.1%} (semantic), "
          f"{agree['codes_equal_all']:.1%} (all {codec.num_codebooks}); decode of identical codes max |diff| "
          f"{agree['decode_max_abs_diff']:.2e} (signal rms {agree['decode_rms']:.2e})\n")
    print(f"{verdict(targets['offline_encode_speedup'])}  offline encode >= {TARGET_SPEEDUP:g}x transformers: "
          f"{speedup['encode']:.2f}x")
    print(f"{verdict(targets['offline_decode_speedup'])}  offline decode >= {TARGET_SPEEDUP:g}x transformers: "
          f"{speedup['decode']:.2f}x")
    print(f"{verdict(targets['stream_decode_frame_ms'])}  streamed decode <= {TARGET_FRAME_MS:g} ms per 80 ms frame "
          f"(B={args.batch}, median): {sd['median_ms']:.1f} ms (p95 {sd['p95_ms']:.1f})")

    if args.json:
        args.json.write_text(json.dumps({
            "env": environment(load),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": r, "speedup": speedup, "agreement": agree, "targets_met": targets,
        }, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
