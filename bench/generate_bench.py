"""CSM-1B frame generation speed: transformers vs csm-jax, same full-size weights, same run, same prompt.

Run from the repository root:

    .venv/bin/python bench/generate_bench.py                   # defaults: --frames 8 --repeats 3 (~5 min)
    .venv/bin/python bench/generate_bench.py --frames 4 --repeats 2 --json generate_bench.json

A full-size transformers `CsmForConditionalGeneration` (CSM-1B shapes, llama3 RoPE, fp32, eager attention, seeded
default-init weights; a tiny Mimi codec, which this benchmark never runs) is saved with `save_pretrained` to a
temporary directory; csm-jax loads it with `load_csm`, transformers with `from_pretrained`, from the same files.
Both generate from the same 30-row prompt (context text, 8 audio frames + the all-zero end-of-audio frame, target
text) with top-k 50 / temperature 0.9 sampling, at batch 1 and batch 4 (4 copies of the prompt).

- transformers: its own `generate(inputs_embeds=..., do_sample=True, top_k=50, temperature=0.9, depth_decoder_*
  likewise)` (DynamicCache, one backbone step then `depth_decoder.generate` per frame; torch default threads).
  A streamer stamps the clock at each emitted frame and a wrapper around `_prefill` times the prompt pass. Frame
  1 (depth decoder only: the prefill already ran the backbone) is not timed; each later frame is one backbone
  step + 31 depth steps, exactly what a csm-jax `Engine.step` does.
- csm-jax: `Generator.engine(B)`: `prefill` (the prompt minus its last row, padded to the 32 bucket; the last row
  is the first step's input), then one `step` per frame (codes copied to the host). The first prefill and step
  (compilation) are reported apart; one untimed step, then `--frames` timed steps.

The sides alternate run by run (order swapped every repeat) so background load hits both; still, run on an idle
machine (the load average is printed). Memory-bandwidth floor: bytes that one frame must read (backbone incl.
the codebook-0 head, plus 31 x (depth decoder + projection + one audio-head slice), plus the KV cache of the
context) divided by the read bandwidth measured in JAX (a jitted sum and a matvec over a 0.5 GiB fp32 array)
right before and after each csm-jax timed run (median: the host's bandwidth drifts a lot on a shared machine).
Targets (2-core CPU): csm-jax >= 3x faster per frame than transformers, and <= 1.5x the floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

import csm_jax
from bench_env import environment, print_environment, verdict

TARGET_SPEEDUP = 3.0
TARGET_FLOOR_RATIO = 1.5
TEMPERATURE, TOP_K = 0.9, 50
BATCHES = (1, 4)
FRAME_MS = 80.0
# CSM-1B's llama3 RoPE in torchtune's form (transformers' CsmConfig() defaults to plain RoPE)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The codec is not benchmarked: a tiny Mimi keeps the checkpoint small (32 quantizers, as CSM needs)
TINY_MIMI = dict(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8, codebook_dim=8, vector_quantization_hidden_dimension=8,
                 num_quantizers=32, codebook_size=16, upsample_groups=16, sliding_window=6)
# --tiny: a few-MB CSM with the same structure, to smoke-test this script in seconds (not a benchmark)
TINY_CSM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, text_vocab_size=1000)
TINY_DEPTH = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


# --------------------------------------------------------------------------------------------- setup ---
def hf_config(tiny: bool) -> transformers.CsmConfig:
    depth = transformers.CsmDepthDecoderConfig(rope_parameters=ROPE, **(TINY_DEPTH if tiny else {}),
                                               **({"backbone_hidden_size": 64} if tiny else {}))
    return transformers.CsmConfig(rope_parameters=ROPE, depth_decoder_config=depth,
                                  codec_config=transformers.MimiConfig(**TINY_MIMI), attn_implementation="eager",
                                  **(TINY_CSM if tiny else {}))


def build_checkpoint(path: Path, seed: int, tiny: bool) -> None:
    """transformers CSM with seeded (default-init) random weights, written with `save_pretrained`, then freed."""
    torch.manual_seed(seed)
    model = transformers.CsmForConditionalGeneration(hf_config(tiny))
    model.save_pretrained(path)
    del model
    gc.collect()


def make_prompt(k: int, text_vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """30 rows: 10 context-text rows, 8 audio frames + the all-zero end-of-audio frame, 11 target-text rows.
    tokens int32 [S, K+1] (column K = text), mask bool [S, K+1]."""
    rng = np.random.default_rng(seed)
    kinds = ["text"] * 10 + ["audio"] * 8 + ["eos"] + ["text"] * 11
    tokens = np.zeros((len(kinds), k + 1), np.int32)
    mask = np.zeros((len(kinds), k + 1), bool)
    for i, kind in enumerate(kinds):
        if kind == "text":
            tokens[i, k], mask[i, k] = rng.integers(0, min(text_vocab, 128_000)), True
        else:
            tokens[i, :k] = rng.integers(0, 2048, k) if kind == "audio" else 0
            mask[i, :k] = True
    return tokens, mask


def hf_inputs_embeds(model: Any, tokens: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The prompt embedded with transformers' own tables: masked sum of the K audio-column embeddings
    (`embed_audio_tokens`, row code + k * vocab) and the text embedding -> float32 [1, S, D]. For text rows and
    audio rows this is what `_merge_input_ids_with_input_values` builds from text ids + encoded audio."""
    k, vocab = model.config.num_codebooks, model.config.vocab_size
    t = torch.from_numpy(tokens.astype(np.int64))[None]
    m = torch.from_numpy(mask).to(torch.float32)[None]
    with torch.inference_mode():
        audio = model.backbone_model.embed_tokens.embed_audio_tokens(t[..., :k] + torch.arange(k) * vocab)
        text = model.embed_text_tokens(t[..., k])
        return (audio * m[..., :k, None]).sum(dim=2) + text * m[..., k, None]


def resident(model: torch.nn.Module) -> None:
    """Copy parameters and buffers into process memory, one tensor at a time. `from_pretrained` may leave them
    memory-mapped from the safetensors file; file-backed pages can be evicted under memory pressure (this run
    holds two 6.2 GB models) and re-read from disk mid-benchmark, which would slow transformers unfairly."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # shared (tied) tensors are listed once
            t.data = t.data.clone()


# --------------------------------------------------------------------------------------------- runs ---
class FrameClock(BaseStreamer):
    """Stamps perf_counter at each frame `generate` emits ([B, K] codes; the empty prompt put is skipped)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2 and value.shape[-1] > 0:
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_run(model: Any, embeds: torch.Tensor, frames: int) -> dict[str, Any]:
    """One `generate` call of frames + 1 frames -> prefill ms and the ms of frames 2..frames+1."""
    clock = FrameClock()
    prefill: list[float] = []
    inner = type(model)._prefill

    def timed_prefill(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(model, *args, **kwargs)
        prefill.append(1000 * (time.perf_counter() - t0))
        return out

    model._prefill = timed_prefill  # instance attribute: times only this model's prompt pass
    try:
        with torch.inference_mode():
            out = model.generate(inputs_embeds=embeds, max_new_tokens=frames + 1, do_sample=True, top_k=TOP_K,
                                 temperature=TEMPERATURE, depth_decoder_do_sample=True, depth_decoder_top_k=TOP_K,
                                 depth_decoder_temperature=TEMPERATURE, streamer=clock)
    finally:
        del model._prefill
    assert len(prefill) == 1, prefill
    steps = [1000 * (b - a) for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"prefill_ms": prefill[0], "frame_ms": steps, "frames_out": int(out.shape[1]),
            "codes": out.numpy()}


def jax_run(eng: Any, prompt: tuple[np.ndarray, np.ndarray], batch: int, frames: int, seed: int) -> dict[str, Any]:
    """prefill (timed) + 1 untimed step + `frames` timed steps; per step the codes come back to the host."""
    state = jax.block_until_ready(eng.init_state())
    t0 = time.perf_counter()
    state = eng.prefill(state, rows=list(range(batch)), prompts=[prompt] * batch,
                        seeds=[seed + i for i in range(batch)], temperature=[TEMPERATURE] * batch,
                        top_k=[TOP_K] * batch)
    state = jax.block_until_ready(state)
    prefill = 1000 * (time.perf_counter() - t0)
    times, codes = [], []
    for _ in range(frames + 1):
        t0 = time.perf_counter()
        state, c = eng.step(state)
        codes.append(np.asarray(c))
        times.append(1000 * (time.perf_counter() - t0))
    del state
    return {"prefill_ms": prefill, "frame_ms": times[1:], "first_step_ms": times[0],
            "codes": np.stack(codes, axis=1)}


def jax_first_calls(eng: Any, prompt: tuple[np.ndarray, np.ndarray], batch: int) -> dict[str, float]:
    """First prefill and first step of a fresh engine (include compilation), then a second step."""
    state = jax.block_until_ready(eng.init_state())
    t0 = time.perf_counter()
    state = jax.block_until_ready(eng.prefill(state, list(range(batch)), [prompt] * batch, list(range(batch)),
                                              [TEMPERATURE] * batch, [TOP_K] * batch))
    t1 = time.perf_counter()
    state, c = eng.step(state)
    np.asarray(c)
    t2 = time.perf_counter()
    state, c = eng.step(state)
    np.asarray(c)
    t3 = time.perf_counter()
    return {"first_prefill_ms": 1000 * (t1 - t0), "first_step_ms": 1000 * (t2 - t1), "second_step_ms": 1000 * (t3 - t2)}


# ---------------------------------------------------------------------------------------- bandwidth ---
class BandwidthProbe:
    """Read bandwidth (GB/s, 1e9 B) of memory-bound jitted JAX ops over one fresh fp32 array of `gib` GiB (many
    times the 32 MiB L3): a full sum and a [1, 4096] x [4096, N] matvec (the shape of a decode step); a probe is
    the faster of the two, each the best of `repeats`. The array lives only during a probe (RAM is tight).
    The host's bandwidth drifts by up to 2x from minute to minute here (shared machine), so probes are taken
    right before and after every csm-jax timed run and the floor uses their median."""

    ROWS = 4096

    def __init__(self, gib: float, repeats: int = 5) -> None:
        self.cols = int(gib * 2**30) // (4 * self.ROWS)
        self.repeats = repeats
        self.ops = {"sum": jax.jit(jnp.sum), "matvec": jax.jit(jnp.matmul)}
        self.array_gb = self.ROWS * self.cols * 4 / 1e9

    def __call__(self) -> dict[str, float]:
        w = jax.block_until_ready(jnp.full((self.ROWS, self.cols), 0.01, jnp.float32))
        x = jnp.ones((1, self.ROWS), jnp.float32)
        out = {}
        for name, args in (("sum", (w,)), ("matvec", (x, w))):
            fn = self.ops[name]
            jax.block_until_ready(fn(*args))
            best = float("inf")
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_gbps"] = self.array_gb / best
        del w
        out["gbps"] = max(out["sum_gbps"], out["matvec_gbps"])
        return out


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def frame_bytes(gen: Any, hf: Any, context: int) -> dict[str, Any]:
    """Bytes one frame reads at batch 1 (weights shared by all rows; KV per row), from the loaded parameters;
    the weight counts are cross-checked against the transformers modules."""
    p, cfg = gen.params, gen.cfg
    k = gen.num_codebooks
    backbone = nbytes(p["backbone"]) + nbytes(p["codebook0_head"])
    depth_step = nbytes(p["decoder"]) + nbytes(p["projection"]) + nbytes(p["audio_head"]) // (cfg.num_codebooks - 1)
    hf_backbone = sum(t.numel() * t.element_size() for n, t in hf.backbone_model.named_parameters()
                      if not n.startswith("embed_tokens")) + hf.lm_head.weight.numel() * 4
    dd = hf.depth_decoder
    hf_depth = (sum(t.numel() * t.element_size() for n, t in dd.model.named_parameters()
                    if not n.startswith("embed_tokens")) + dd.codebooks_head.weight[0].numel() * 4)
    assert (backbone, depth_step) == (hf_backbone, hf_depth), ((backbone, depth_step), (hf_backbone, hf_depth))
    bb, de = cfg.backbone, cfg.decoder
    kv_pos_bb = bb.num_layers * 2 * bb.num_kv_heads * bb.head_dim * 4  # fp32 bytes per cached position
    kv_pos_de = de.num_layers * 2 * de.num_kv_heads * de.head_dim * 4
    kv_backbone = kv_pos_bb * context  # one step attends over the whole context
    kv_depth = kv_pos_de * sum(range(2, k + 1))  # depth step i attends over i + 1 positions
    return {
        "backbone_bytes": backbone, "depth_step_bytes": depth_step, "codebooks": k,
        "weight_bytes": backbone + (k - 1) * depth_step, "kv_bytes_per_row": kv_backbone + kv_depth,
        "context_positions": context,
        "jax_static_kv_bytes_per_row": kv_pos_bb * bb.max_seq_len,  # the engine attends over all cache slots
    }


# ------------------------------------------------------------------------------------------- report ---
def stats(times: list[float]) -> dict[str, Any]:
    return {"min_ms": min(times), "median_ms": statistics.median(times), "max_ms": max(times), "times_ms": times}


def rss_gb(field: str = "VmRSS") -> float:
    """Resident memory (GB) now; "RssAnon" excludes file-backed pages (the kernel may drop those)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def memory() -> str:
    return f"RSS {rss_gb():.1f} GB (anon {rss_gb('RssAnon'):.1f}, peak {peak_rss_gb():.1f})"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class OtherLoad:
    """CPU time used by other processes since construction, from /proc/stat minus this process's own time.
    On 2 cores torch's OpenMP threads stall badly when another process takes a core, so this is reported."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait, seconds

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float:
        """Mean number of cores other processes kept busy."""
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other) / max(time.perf_counter() - self.t0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8, help="timed frames per run and side (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth-gib", type=float, default=0.5, help="array size of the bandwidth probe (default 0.5)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test this script on a tiny CSM (not a benchmark)")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = ap.parse_args()
    if args.frames < 1 or args.repeats < 1:
        ap.error("--frames and --repeats must be >= 1")
    t_start = time.perf_counter()

    load = print_environment()
    if args.tiny:
        print("--tiny: a small CSM, to test this script only; the numbers below are not a benchmark")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="generate_bench_", dir="/tmp") as tmp:
        t0 = time.perf_counter()
        build_checkpoint(Path(tmp), args.seed, args.tiny)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e9
        t1 = time.perf_counter()
        gen = csm_jax.load_csm(tmp)  # first: its load-time copies are gone before transformers loads (RAM)
        gc.collect()
        t2 = time.perf_counter()
        hf = transformers.CsmForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager").eval()
        resident(hf)
        gc.collect()
        t3 = time.perf_counter()
    assert next(hf.parameters()).dtype == torch.float32 and gen.cfg.compute_dtype == jnp.float32
    n_params = sum(t.numel() for t in hf.parameters() if t is not None) - sum(
        t.numel() for t in hf.codec_model.parameters())
    print(f"CSM ({n_params / 1e9:.3f} G parameters without the codec, fp32, seed {args.seed}): built and saved "
          f"({size:.1f} GB) in {t1 - t0:.0f} s; loaded by csm-jax in {t2 - t1:.0f} s, by transformers in "
          f"{t3 - t2:.0f} s | {memory()}")

    leaf_types = sorted({type(x).__module__.split(".")[0] + "." + type(x).__name__
                         for x in jax.tree_util.tree_leaves(gen.params)})
    print(f"csm-jax parameter leaves as loaded: {', '.join(leaf_types)}" + (
        "  <- host arrays: every jitted call copies them into XLA buffers" if "numpy.ndarray" in leaf_types else ""))
    k = gen.num_codebooks
    tokens, mask = make_prompt(k, gen.cfg.text_vocab_size, args.seed)
    prompt = (tokens, mask)
    embeds1 = hf_inputs_embeds(hf, tokens, mask)
    context = len(tokens) + 1 + args.frames  # positions at the last timed frame (an upper bound for KV reads)
    fb = frame_bytes(gen, hf, context)

    probe = BandwidthProbe(0.02 if args.tiny else args.bandwidth_gib)
    p0 = probe()
    print(f"read bandwidth probe (JAX, {probe.array_gb:.2f} GB fp32 array): sum {p0['sum_gbps']:.1f} GB/s, matvec "
          f"{p0['matvec_gbps']:.1f} GB/s")
    probes: dict[int, list[dict[str, float]]] = {b: [] for b in BATCHES}
    r: dict[str, Any] = {}
    first: dict[int, dict[str, float]] = {}
    other_cores: dict[int, float] = {}
    for b in BATCHES:
        embeds = embeds1.expand(b, -1, -1).contiguous()
        eng = gen.engine(b)
        t0 = time.perf_counter()
        hf_run(hf, embeds, 1)  # warmup (allocator, first-call overheads)
        t_hf_warm = time.perf_counter() - t0
        first[b] = jax_first_calls(eng, prompt, b)
        print(f"B={b}: transformers warmup generate (2 frames) {t_hf_warm:.1f} s; csm-jax first prefill "
              f"{first[b]['first_prefill_ms'] / 1000:.1f} s, first step {first[b]['first_step_ms'] / 1000:.1f} s "
              f"(incl. compile) | {memory()}")
        runs: dict[str, list[dict[str, Any]]] = {"hf": [], "jax": []}
        other = OtherLoad()
        for rep in range(args.repeats):
            order = ("hf", "jax") if rep % 2 == 0 else ("jax", "hf")
            for side in order:
                if side == "hf":
                    runs["hf"].append(hf_run(hf, embeds, args.frames))
                else:
                    probes[b].append(probe())
                    runs["jax"].append(jax_run(eng, prompt, b, args.frames, args.seed + 100 * rep))
                    probes[b].append(probe())
        for side, rs in runs.items():
            frame_ms = [t for run in rs for t in run["frame_ms"]]
            r[f"{side}_b{b}"] = {
                "frame": stats(frame_ms), "prefill": stats([run["prefill_ms"] for run in rs]),
                **({"frames_out": [run["frames_out"] for run in rs]} if side == "hf" else {}),
            }
            codes = np.concatenate([run["codes"].reshape(-1, k) for run in rs])
            assert codes.min() >= 0 and codes.max() < gen.cfg.audio_vocab_size, (side, codes.min(), codes.max())
            r[f"{side}_b{b}"]["distinct_codes"] = int(len(np.unique(codes)))
        other_cores[b] = other.cores()
        h, j = r[f"hf_b{b}"], r[f"jax_b{b}"]
        print(f"B={b}: ms per frame min/median: transformers {h['frame']['min_ms']:.0f} / "
              f"{h['frame']['median_ms']:.0f}, csm-jax {j['frame']['min_ms']:.0f} / {j['frame']['median_ms']:.0f} "
              f"(done at {time.perf_counter() - t_start:.0f} s; other processes used {other_cores[b]:.2f} cores "
              f"meanwhile) | {memory()}")
        del eng
        gc.collect()

    bw = {b: statistics.median(p["gbps"] for p in probes[b]) for b in BATCHES}
    print()
    for b in BATCHES:
        g = sorted(p["gbps"] for p in probes[b])
        print(f"read bandwidth around the B={b} csm-jax runs ({len(g)} probes, {probe.array_gb:.2f} GB fp32, best of "
              f"sum / matvec): min {g[0]:.1f}, median {bw[b]:.1f}, max {g[-1]:.1f} GB/s")
    print()

    floor = {b: (fb["weight_bytes"] + b * fb["kv_bytes_per_row"]) / (bw[b] * 1e9) * 1000 for b in BATCHES}
    speedup = {b: r[f"hf_b{b}"]["frame"]["median_ms"] / r[f"jax_b{b}"]["frame"]["median_ms"] for b in BATCHES}
    floor_ratio = {b: r[f"jax_b{b}"]["frame"]["median_ms"] / floor[b] for b in BATCHES}
    prefill_speedup = {b: r[f"hf_b{b}"]["prefill"]["median_ms"] / r[f"jax_b{b}"]["prefill"]["median_ms"]
                       for b in BATCHES}

    rows = [(f"ms per frame, B={b} (one step, all rows)", "frame", b) for b in BATCHES]
    rows += [(f"prefill {len(tokens)}-row prompt, B={b}", "prefill", b) for b in BATCHES]
    w = max(len(label) for label, _, _ in rows)
    print(f"{'what':<{w}} | {'transformers min/median ms':>26} | {'csm-jax min/median ms':>22} | speedup")
    print("-" * (w + 64))
    for label, key, b in rows:
        h, j = r[f"hf_b{b}"][key], r[f"jax_b{b}"][key]
        sp = h["median_ms"] / j["median_ms"]
        print(f"{label:<{w}} | {h['min_ms']:12.1f} / {h['median_ms']:9.1f} | {j['min_ms']:9.1f} / "
              f"{j['median_ms']:9.1f} | {sp:6.2f}x")
    print(f"(speedup = transformers median / csm-jax median; {args.repeats} runs x {args.frames} timed frames per "
          f"side and batch size; transformers' frame 1 and csm-jax's first step untimed; transformers prefill is "
          f"the prompt pass inside generate ({len(tokens)} rows), csm-jax prefill caches {len(tokens) - 1} rows "
          f"padded to a 32-row bucket)\n")

    for b in BATCHES:
        f = first[b]
        print(f"csm-jax B={b} first calls (incl. compile): prefill {f['first_prefill_ms']:.0f} ms, step "
              f"{f['first_step_ms']:.0f} ms (second step {f['second_step_ms']:.0f} ms)")
    for b in BATCHES:
        h, j = r[f"hf_b{b}"], r[f"jax_b{b}"]
        print(f"B={b} per-row throughput: transformers {b * 1000 / h['frame']['median_ms']:.2f} frames/s "
              f"(RTF {h['frame']['median_ms'] / FRAME_MS:.1f}), csm-jax {b * 1000 / j['frame']['median_ms']:.2f} "
              f"frames/s (RTF {j['frame']['median_ms'] / FRAME_MS:.1f}) | frames per transformers run "
              f"{h['frames_out']} | distinct codes hf {h['distinct_codes']}, jax {j['distinct_codes']}")

    gb = 1e9
    print(f"\nbytes read per frame (fp32): backbone + codebook-0 head {fb['backbone_bytes'] / gb:.3f} GB + "
          f"{k - 1} x (depth decoder + projection + one audio-head slice) {fb['depth_step_bytes'] / gb:.4f} GB = "
          f"{fb['weight_bytes'] / gb:.2f} GB weights, + KV cache <= {fb['kv_bytes_per_row'] / 1e6:.1f} MB per row "
          f"(<= {context} positions)")
    print(f"(csm-jax's static cache is read in full each step: {fb['jax_static_kv_bytes_per_row'] / 1e6:.0f} MB per "
          f"row, not counted in the floor)")
    for b in BATCHES:
        print(f"bandwidth floor B={b}: {(fb['weight_bytes'] + b * fb['kv_bytes_per_row']) / gb:.2f} GB / "
              f"{bw[b]:.1f} GB/s = {floor[b]:.0f} ms per frame; csm-jax median "
              f"{r[f'jax_b{b}']['frame']['median_ms']:.0f} ms = {floor_ratio[b]:.2f}x the floor; transformers "
              f"{r[f'hf_b{b}']['frame']['median_ms'] / floor[b]:.2f}x")

    targets = {}
    print()
    for b in BATCHES:
        targets[f"speedup_b{b}"] = speedup[b] >= TARGET_SPEEDUP
        print(f"{verdict(targets[f'speedup_b{b}'])}  B={b}: csm-jax >= {TARGET_SPEEDUP:g}x faster per frame than "
              f"transformers: {speedup[b]:.2f}x")
    for b in BATCHES:
        targets[f"floor_b{b}"] = floor_ratio[b] <= TARGET_FLOOR_RATIO
        print(f"{verdict(targets[f'floor_b{b}'])}  B={b}: csm-jax <= {TARGET_FLOOR_RATIO:g}x the bandwidth floor: "
              f"{floor_ratio[b]:.2f}x ({r[f'jax_b{b}']['frame']['median_ms']:.0f} vs {floor[b]:.0f} ms)")
    busy = max(other_cores.values())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s | peak RSS {peak_rss_gb():.1f} GB | other processes used "
          f"{', '.join(f'{c:.2f}' for c in other_cores.values())} cores during the B={', '.join(map(str, BATCHES))} "
          f"timed runs" + ("  <- the machine was not idle: re-run; transformers' OpenMP threads suffer most"
                           if busy > 0.1 else ""))

    if args.json:
        args.json.write_text(json.dumps({
            "env": {**environment(load), "peak_rss_gb": peak_rss_gb(),
                    "other_process_cores_during_timed_runs": other_cores},
            "args": {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()},
            "prompt_rows": len(tokens), "jax_param_leaf_types": leaf_types, "results": r, "jax_first_calls": first,
            "bandwidth_gbps": bw, "bandwidth_probes": {"start": p0, **probes}, "bytes": fb,
            "floor_ms": floor, "speedup": speedup, "prefill_speedup": prefill_speedup, "floor_ratio": floor_ratio,
            "targets_met": targets,
        }, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
