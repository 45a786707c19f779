"""CSM-1B int8 frame generation: csm-jax int8 against transformers fp32 and transformers with torch's dynamic int8
quantisation of its Linear layers, same full-size weights, same run, same prompt.

    .venv/bin/python bench/int8_bench.py                     # --frames 6 --repeats 2 (~10 min on 2 idle cores)
    .venv/bin/python bench/int8_bench.py --tiny              # smoke test of the script (not a benchmark)

The checkpoint, prompt, sampling (top-k 50, temperature 0.9), timing of transformers' `generate` and of csm-jax's
`Engine.prefill` / `step` are `generate_bench.py`'s (see there). Sides, alternating run by run at B = 1 and 4:
- `hf_fp32`: transformers as loaded;
- `hf_int8`: a second load, `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, torch.qint8, inplace=True)`
  (int8 weights, activations quantised per call: what torch offers on CPU);
- `jax_int8`: `load_csm(path, quantize="int8")`: int8 kernels of the backbone, depth decoder, projection and audio
  head with per-output-channel scales (codebook 0's head stays float, `quantize.FLOAT_KERNELS`), float32 compute
  on CPU (the backend policy's `quantized_compute_dtype`).
Printed: ms per frame (min / median), the speedups (target at B=1: >= 3x transformers fp32, >= 1.5x transformers
int8) and the int8 bandwidth floor: the bytes one frame reads (int8 kernels + their scales + the float32 norms and head,
the KV cache of the context) over the read bandwidth probed in JAX.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_env import print_environment, verdict
from generate_bench import (
    BandwidthProbe,
    OtherLoad,
    build_checkpoint,
    hf_inputs_embeds,
    hf_run,
    jax_first_calls,
    jax_run,
    make_prompt,
    memory,
    nbytes,
    resident,
    stats,
)

import csm_jax

BATCHES = (1, 4)
TARGETS = {"hf_fp32": 3.0, "hf_int8": 1.5}  # csm-jax int8 speedup over each, at B=1


def int8_frame_bytes(gen: Any, context: int) -> int:
    """Bytes one frame reads at B=1 with int8 kernels: backbone + codebook-0 head, K-1 depth steps (decoder,
    projection, one audio-head slice), and the KV cache of `context` positions (float32)."""
    p, cfg, k = gen.params, gen.cfg, gen.num_codebooks
    backbone = nbytes(p["backbone"]) + nbytes(p["codebook0_head"]) + nbytes(p.get("codebook0_head_scale", {}))
    head = nbytes(p["audio_head"]) + nbytes(p.get("audio_head_scale", {}))
    depth = nbytes(p["decoder"]) + nbytes(p["projection"]) + nbytes(p.get("projection_scale", {})) \
        + head // (cfg.num_codebooks - 1)
    bb = cfg.backbone
    kv = bb.num_layers * 2 * bb.num_kv_heads * bb.head_dim * 4 * context
    return backbone + (k - 1) * depth + kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="smoke-test this script on a tiny CSM (not a benchmark)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t_start = time.perf_counter()
    print_environment()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.supported_engines[-1]

    with tempfile.TemporaryDirectory(prefix="int8_bench_", dir="/tmp") as tmp:
        build_checkpoint(Path(tmp), args.seed, args.tiny)
        gen = csm_jax.load_csm(tmp, quantize="int8")
        gc.collect()
        hf = transformers.CsmForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager").eval()
        resident(hf)
        hf8 = transformers.CsmForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager").eval()
        resident(hf8)
        torch.ao.quantization.quantize_dynamic(hf8, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        gc.collect()
    quantized = sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in hf8.modules())
    print(f"loaded: csm-jax int8, transformers fp32, transformers dynamic int8 ({quantized} quantised Linear "
          f"modules) in {time.perf_counter() - t_start:.0f} s | {memory()}")
    k = gen.num_codebooks
    tokens, mask = make_prompt(k, gen.cfg.text_vocab_size, args.seed)
    embeds1 = hf_inputs_embeds(hf, tokens, mask)
    probe = BandwidthProbe(0.02 if args.tiny else 0.5)
    results: dict[str, Any] = {}
    bandwidth: list[float] = []
    for b in BATCHES:
        embeds = embeds1.expand(b, -1, -1).contiguous()
        eng = gen.engine(b)
        first = jax_first_calls(eng, (tokens, mask), b)
        for model in (hf, hf8):
            hf_run(model, embeds, 1)  # warmup
        runs: dict[str, list[dict[str, Any]]] = {"hf_fp32": [], "hf_int8": [], "jax_int8": []}
        other = OtherLoad()
        for rep in range(args.repeats):
            order = list(runs) if rep % 2 == 0 else list(reversed(list(runs)))
            for side in order:
                if side == "jax_int8":
                    bandwidth.append(probe()["gbps"])
                    runs[side].append(jax_run(eng, (tokens, mask), b, args.frames, args.seed + 100 * rep))
                else:
                    runs[side].append(hf_run(hf if side == "hf_fp32" else hf8, embeds, args.frames))
        for side, rs in runs.items():
            results[f"{side}_b{b}"] = {"frame": stats([t for r in rs for t in r["frame_ms"]]),
                                       "prefill": stats([r["prefill_ms"] for r in rs])}
        results[f"jax_int8_b{b}"]["first_calls"] = first
        results[f"other_cores_b{b}"] = other.cores()
        med = {side: results[f"{side}_b{b}"]["frame"]["median_ms"] for side in runs}
        print(f"B={b}: ms per frame (median): transformers fp32 {med['hf_fp32']:.0f}, transformers int8 "
              f"{med['hf_int8']:.0f}, csm-jax int8 {med['jax_int8']:.0f} (other processes used "
              f"{results[f'other_cores_b{b}']:.2f} cores) | {memory()}", flush=True)
        del eng
        gc.collect()

    bw = statistics.median(bandwidth)
    floor_bytes = int8_frame_bytes(gen, len(tokens) + 1 + args.frames)
    floor_ms = floor_bytes / (bw * 1e9) * 1000
    print()
    ok = True
    for b in BATCHES:
        j = results[f"jax_int8_b{b}"]["frame"]["median_ms"]
        for ref, target in TARGETS.items():
            sp = results[f"{ref}_b{b}"]["frame"]["median_ms"] / j
            results[f"speedup_vs_{ref}_b{b}"] = sp
            line = f"B={b}: csm-jax int8 {sp:.2f}x faster per frame than transformers {ref[3:]}"
            if b == 1:
                ok &= sp >= target
                print(f"{verdict(sp >= target)}  {line} (target >= {target:g}x)")
            else:
                print(f"      {line}")
    print(f"int8 bandwidth floor (B=1): {floor_bytes / 1e9:.2f} GB per frame / {bw:.1f} GB/s = {floor_ms:.0f} ms; "
          f"csm-jax int8 median {results['jax_int8_b1']['frame']['median_ms']:.0f} ms = "
          f"{results['jax_int8_b1']['frame']['median_ms'] / floor_ms:.2f}x the floor")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k_: str(v) for k_, v in vars(args).items()}, "results": results,
                                         "bandwidth_gbps": bw, "int8_floor_bytes": floor_bytes,
                                         "int8_floor_ms": floor_ms, "targets_met": ok}, indent=2))



if __name__ == "__main__":
    main()
