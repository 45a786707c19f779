"""Serving speed of CSM-1B + Mimi on one accelerator, self-contained: random weights made on the device, no torch.

    python bench/gpu_bench.py --out gpu_bench.jsonl              # on a GPU: full CSM-1B + official Mimi (< 8 min)
    python bench/gpu_bench.py --tiny --out tiny.jsonl             # tiny configs (default on CPU): a smoke test

Every result is one JSON line, printed to stdout and appended to `--out` (flushed at once), so a run cut off by a
timeout keeps what it measured. Each line has `kind`; a measurement that failed carries `error`, one that was not
run carries `skipped` (the reason). Kinds, in the order they are measured:

- `env`: backend, device kind and count, jax/jaxlib/flax versions, mode (full/tiny), the arguments.
- `bandwidth` (phase start / end): read bandwidth in GB/s (1e9 B/s) of memory-bound jitted ops over one fresh
  array: a float32 sum and a bf16 [1, 4096] x [4096, N] matvec (the shape of a decode step), each dispatched
  back to back `--bandwidth-reps` times and synchronised once; `gbps` is the faster of the two.
- `floor` (per variant and batch): bytes one frame must read / the start bandwidth. Weights: backbone + codebook-0
  head + (K-1) x (depth decoder + projection + one audio-head slice), at the variant's bytes per parameter
  (nominal for a variant this csm_jax cannot build); KV: the positions in use (`floor_ms`), and the whole static
  cache the engine attends over (`floor_static_kv_ms`: every one of max_seq_len slots, per row).
- `params`, `codec`: building the random weights on the device (jitted `init`, so nothing crosses from the host).
- `frame` (per variant and batch): `Engine.step` after a prefill of a 30-row prompt into every row, codes copied
  to the host after each step (as the scheduler does); median / min / p90 ms over `--steps` after `--warmup`
  untimed steps, `pipelined_ms` (steps dispatched back to back, one sync: the device time without the host round
  trip), `first_call_s` (prefill + first step, compilation included), frames/s, RTF (ms / 80) and the ratio to
  the floor.
- `ttfa` (per prompt length, batch 1 by default): prefill of one row + the first step + codes to the host + the
  streaming Mimi decode of that frame + audio to the host, from a fresh state; median of `--ttfa-repeats` after
  one untimed run (which compiles the prompt's bucket), with each part's median.
- `mimi_decode` (per batch): one `StreamDecoder.step` of random codes [B, K] + audio to the host.
- `serving_frame` (per batch): what the scheduler does per frame: `Engine.step`, codes to the host, the batched
  streaming Mimi decode, audio to the host.
- `summary`: wall time, counts, what the time budget skipped.

Variants (`--variants`, default bf16,int8,fp32; fp32 only at `--fp32-batches`, default 1):
- `fp32`: float32 weights and compute (the library's default).
- `bf16`: weights cast to bfloat16 on the device and `CsmConfig(dtype="bfloat16")`: the model casts each weight
  to its compute dtype, a no-op for bf16 weights, so a frame reads 2 bytes per parameter.
- `bf16_f32w` (not in the default list): `dtype="bfloat16"` over float32 weights, which is what
  `load_csm(..., dtype="bfloat16")` and the server's `model.dtype=bfloat16` give today.
- `bf16_f32` (not in the default list): weight-only bf16 computing in float32 (`quantize_params(params, cfg,
  "bf16", "float32")`): 2 bytes per parameter read like `bf16`, float32 product inputs and KV cache; what it costs
  over `bf16` is the price of its better agreement with float32 (`precision_bench.py`).
- `int8`: run when csm_jax offers int8 weights, found at run time by `int8_support()` (no change here needed):
  either a module `csm_jax.csm.quantize` with `quantize_params(params, cfg, "int8") -> (params, cfg)` (what
  `Engine(params, cfg, B)` then takes), or a `CsmConfig` field `weights_dtype` accepting "int8" (the engine
  quantizes the float weights it is given). Otherwise one line per batch:
  `{"kind": "frame", "variant": "int8", "skipped": "not supported by this csm_jax version ..."}`.

`--time-budget-s` (default 400 full, 300 tiny): no new measurement starts once that much wall time has passed;
the ones left are listed in `summary`. The order puts bf16 first (frame, TTFA, Mimi, serving frame per batch),
then int8, then fp32. Audio-file modules the csm_jax package imports but this bench never calls (soundfile, soxr,
pyloudnorm) are replaced by empty stubs when missing, so a stock JAX GPU image runs it with nothing installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("csm_jax") is None:  # run from a plain checkout (no editable install)
    sys.path.insert(0, str(ROOT))

AUDIO_IO_MODULES = ("soundfile", "soxr", "pyloudnorm")  # imported by csm_jax.audio at import time, used only in calls
STUBBED: list[str] = []


def stub_missing_modules(names: tuple[str, ...]) -> None:
    """An empty module for each missing name: `import name` works, any attribute use raises AttributeError."""
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)

        def missing(attr: str, _name: str = name) -> Any:
            raise AttributeError(f"{_name} is not installed (stubbed by bench/gpu_bench.py), no {attr!r}")

        module.__getattr__ = missing  # type: ignore[method-assign]
        sys.modules[name] = module
        STUBBED.append(name)


stub_missing_modules(AUDIO_IO_MODULES)

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.csm.config import CsmConfig, LlamaConfig, csm_1b
from csm_jax.csm.engine import Engine
from csm_jax.csm.model import Csm

FRAME_MS = 80.0
TEMPERATURE, TOP_K = 0.9, 50
VARIANTS = ("fp32", "bf16", "bf16_f32w", "bf16_f32", "int8")
WEIGHT_ITEMSIZE = {"fp32": 4, "bf16": 2, "bf16_f32w": 4, "bf16_f32": 2, "int8": 1}  # nominal bytes per parameter read
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "bf16_f32w": "bfloat16", "bf16_f32": "float32",
                 "int8": "bfloat16"}
FULL = {"batches": "1,4,16,64", "steps": 20, "warmup": 3, "ttfa_repeats": 5, "bandwidth_gib": 2.0,
        "time_budget_s": 400.0}
TINY = {"batches": "1,2", "steps": 3, "warmup": 1, "ttfa_repeats": 2, "bandwidth_gib": 0.03,
        "time_budget_s": 300.0}


# ------------------------------------------------------------------------------------------- configs ---
def tiny_csm() -> CsmConfig:
    """A few-hundred-kB CSM with CSM-1B's structure (one layer per stack, 4 codebooks, 512 positions)."""
    backbone = LlamaConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                           intermediate_size=128, max_seq_len=512)
    decoder = LlamaConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=64, max_seq_len=4)
    return CsmConfig(backbone=backbone, decoder=decoder, text_vocab_size=256, num_codebooks=4)


def tiny_mimi() -> MimiConfig:
    """Mimi's 80 ms / 1920-sample frame and 2048-entry codebooks, one narrow layer, 4 quantizers."""
    return MimiConfig(hidden_size=32, num_filters=4, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      intermediate_size=64, codebook_dim=16, num_quantizers=4, upsample_groups=32)


# ------------------------------------------------------------------------------------------- output ---
def _clean(value: Any) -> Any:
    """JSON-able: numpy scalars to Python, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class Out:
    """JSON lines to stdout and to `path`, each flushed as soon as it is written."""

    def __init__(self, path: Path | None):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w")  # noqa: SIM115 (open for the whole run, closed in main)
        self.counts: dict[str, int] = {}

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = _clean({"kind": kind, **fields, "t_s": round(time.perf_counter() - T0, 3)})
        line = json.dumps(record, allow_nan=False)
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Runner:
    """Runs one measurement: not started once the time budget is spent, and an exception becomes an `error`
    line (the run goes on)."""

    def __init__(self, out: Out, budget_s: float):
        self.out, self.budget_s = out, budget_s
        self.skipped: list[dict[str, Any]] = []
        self.errors = 0

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def __call__(self, kind: str, fn: Callable[[], Any], always: bool = False, **meta: Any) -> Any:
        if not always and self.elapsed() > self.budget_s:
            reason = f"time budget of {self.budget_s:g} s spent ({self.elapsed():.0f} s elapsed)"
            self.out.emit(kind, **meta, skipped=reason)
            self.skipped.append({"kind": kind, **meta})
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (one failure must not stop the other measurements)
            self.errors += 1
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.out.emit(kind, **meta, error=f"{type(e).__name__}: {e}"[:2000], traceback=tail)
            return None


# -------------------------------------------------------------------------------------------- timing ---
def ms_since(t0: float) -> float:
    return 1000 * (time.perf_counter() - t0)


def summary(times_ms: list[float]) -> dict[str, Any]:
    s = sorted(times_ms)
    return {"median_ms": statistics.median(s), "min_ms": s[0], "p90_ms": s[max(0, math.ceil(0.9 * len(s)) - 1)],
            "n": len(s)}


def bandwidth_probe(gib: float, reps: int) -> dict[str, float]:
    """Read GB/s of a float32 sum and a bf16 matvec over fresh `gib`-GiB arrays (made on the device)."""
    rows = 4096
    out: dict[str, float] = {}
    cols32 = max(1, int(gib * 2**30) // (4 * rows))
    cols16 = max(1, int(gib * 2**30) // (2 * rows))
    cases = {
        "sum_f32": (jax.jit(jnp.sum), lambda: (jnp.full((rows, cols32), 0.5, jnp.float32),), rows * cols32 * 4),
        "matvec_bf16": (jax.jit(jnp.matmul), lambda: (jnp.ones((1, rows), jnp.bfloat16),
                                                      jnp.full((rows, cols16), 0.5, jnp.bfloat16)), rows * cols16 * 2),
    }
    for name, (fn, make, nbytes) in cases.items():
        args = jax.block_until_ready(make())
        jax.block_until_ready(fn(*args))  # compile
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            results = [fn(*args) for _ in range(reps)]
            jax.block_until_ready(results)
            best = min(best, (time.perf_counter() - t0) / reps)
        out[f"{name}_gbps"] = nbytes / best / 1e9
        out[f"{name}_bytes"] = nbytes
        del args, results
    out["gbps"] = max(out["sum_f32_gbps"], out["matvec_bf16_gbps"])
    return out


# --------------------------------------------------------------------------------------------- model ---
def init_fn(cfg: CsmConfig) -> Callable[[jax.Array], Any]:
    k = cfg.num_codebooks

    def init(key: jax.Array) -> Any:
        tokens, mask = jnp.zeros((1, 1, k + 1), jnp.int32), jnp.ones((1, 1, k + 1), bool)
        return nn.meta.unbox(Csm(cfg).init(key, tokens, mask)["params"])

    return init


def count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def frame_weights(params: Any, cfg: CsmConfig, size: Callable[[Any], float]) -> dict[str, float]:
    """What one frame reads of the weights: backbone + codebook-0 head, then per depth step (K-1 of them) the
    decoder, the projection and one codebook's slice of the audio head. `size` measures a subtree."""
    k = cfg.num_codebooks
    backbone = size(params["backbone"]) + size(params["codebook0_head"])
    depth_step = size(params["decoder"]) + size(params["projection"]) + size(params["audio_head"]) / (k - 1)
    return {"backbone": backbone, "depth_step": depth_step, "frame": backbone + (k - 1) * depth_step}


def kv_bytes(cfg: CsmConfig, positions: int, itemsize: int) -> dict[str, int]:
    """KV bytes one step reads per row: the backbone's `positions` positions (or all max_seq_len static slots)
    plus the depth decoder's (step i attends over i + 1 positions)."""
    bb, de, k = cfg.backbone, cfg.decoder, cfg.num_codebooks
    per_pos_bb = bb.num_layers * 2 * bb.num_kv_heads * bb.head_dim * itemsize
    depth = de.num_layers * 2 * de.num_kv_heads * de.head_dim * itemsize * sum(range(2, k + 1))
    return {"context": per_pos_bb * positions + depth, "static": per_pos_bb * bb.max_seq_len + depth}


class Unsupported(Exception):
    """This csm_jax cannot build the variant."""


def int8_support() -> Callable[[Any, CsmConfig], tuple[Any, CsmConfig]] | str:
    """How int8 weights are made with this csm_jax, or why they cannot be. Checked at run time, in order:
    1. `csm_jax.csm.quantize.quantize_params(params, cfg, "int8") -> (params, cfg)`, fed to `Engine` unchanged;
    2. a `CsmConfig` field `weights_dtype` that accepts "int8" (float weights; the engine quantizes them)."""
    try:
        module = importlib.import_module("csm_jax.csm.quantize")
    except ImportError:
        module = None
    if module is not None and callable(getattr(module, "quantize_params", None)):
        return lambda params, cfg: module.quantize_params(params, cfg, "int8")
    if "weights_dtype" in {f.name for f in dataclasses.fields(CsmConfig)}:
        return lambda params, cfg: (params, cfg.replace(weights_dtype="int8", dtype="bfloat16"))
    return ("not supported by this csm_jax version (no csm_jax.csm.quantize.quantize_params and no "
            "CsmConfig.weights_dtype)")


def build_variant(name: str, params32: Any, cfg32: CsmConfig) -> tuple[Any, CsmConfig]:
    """(params, cfg) of a variant, made on the device from the float32 parameters."""
    if name == "fp32":
        return params32, cfg32
    if name == "bf16_f32w":
        return params32, cfg32.replace(dtype="bfloat16")
    if name == "bf16":
        cast = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p))
        return cast(params32), cfg32.replace(dtype="bfloat16")
    if name == "bf16_f32":
        from csm_jax.csm.quantize import quantize_params

        return quantize_params(params32, cfg32, "bf16", "float32")
    if name == "int8":
        hook = int8_support()
        if isinstance(hook, str):
            raise Unsupported(hook)
        return hook(params32, cfg32)
    raise ValueError(f"unknown variant {name!r}")


def weights_dtype(params: Any) -> str:
    return ",".join(sorted({str(np.dtype(x.dtype)) for x in jax.tree_util.tree_leaves(params)}))


def make_prompt(rows: int, k: int, text_vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A `rows`-row request as the server builds one: context text, its audio frames and the all-zero end
    frame, then the target text (about a quarter of the rows text). tokens int32 [S, K+1], mask bool."""
    if rows < 4:
        raise ValueError("a prompt needs at least 4 rows")
    rng = np.random.default_rng(seed)
    n_text = max(2, rows // 4)
    n_ctx = n_text // 2
    kinds = ["text"] * n_ctx + ["audio"] * (rows - n_text - 1) + ["end"] + ["text"] * (n_text - n_ctx)
    tokens = np.zeros((rows, k + 1), np.int32)
    mask = np.zeros((rows, k + 1), bool)
    for i, kind in enumerate(kinds):
        if kind == "text":
            tokens[i, k], mask[i, k] = rng.integers(0, text_vocab), True
        else:
            tokens[i, :k] = rng.integers(0, 2048, k) if kind == "audio" else 0
            mask[i, :k] = True
    return tokens, mask


# ------------------------------------------------------------------------------------- measurements ---
@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    out: Out
    run: Runner
    cfg32: CsmConfig
    mimi_cfg: MimiConfig
    bandwidth_gbps: float | None = None
    codec: MimiCodec | None = None
    decoders: dict[int, Any] = dataclasses.field(default_factory=dict)
    mimi_done: set[int] = dataclasses.field(default_factory=set)

    @property
    def code_limit(self) -> int:
        """Sampled codes stay in the codec's range (as the server asks), so they can be decoded."""
        return self.mimi_cfg.codebook_size

    def prefill(self, eng: Engine, state: Any, rows: list[int], prompt: tuple[np.ndarray, np.ndarray]) -> Any:
        n = len(rows)
        return eng.prefill(state, rows, [prompt] * n, seeds=[self.args.seed + r for r in rows],
                           temperature=[TEMPERATURE] * n, top_k=[TOP_K] * n, code_limit=[self.code_limit] * n)

    def decoder(self, batch: int) -> Any:
        if self.codec is None:
            raise RuntimeError("the Mimi codec was not built (see its `codec` line)")
        if batch not in self.decoders:
            self.decoders[batch] = self.codec.stream_decoder(batch)
        return self.decoders[batch]

    def floor(self, variant: str, batch: int, weight_bytes: float, positions: int) -> dict[str, Any]:
        kv = kv_bytes(self.cfg32, positions, np.dtype(COMPUTE_DTYPE[variant]).itemsize)
        ctx = weight_bytes + batch * kv["context"]
        static = weight_bytes + batch * kv["static"]
        bw = self.bandwidth_gbps
        return {"weight_bytes": weight_bytes, "kv_bytes_per_row": kv["context"],
                "static_kv_bytes_per_row": kv["static"], "context_positions": positions,
                "frame_bytes": ctx, "floor_ms": ctx / (bw * 1e9) * 1000 if bw else None,
                "floor_static_kv_ms": static / (bw * 1e9) * 1000 if bw else None}

    # -- CSM frame ---------------------------------------------------------------------------------------
    def frames(self, variant: str, eng: Engine, batch: int, weight_bytes: float, extra: dict[str, Any]) -> Any:
        a = self.args
        prompt = make_prompt(a.prompt_rows, self.cfg32.num_codebooks, self.cfg32.text_vocab_size, a.seed)
        t0 = time.perf_counter()
        state = self.prefill(eng, eng.init_state(), list(range(batch)), prompt)
        state, codes = eng.step(state)
        np.asarray(codes)
        first_call_s = time.perf_counter() - t0
        for _ in range(a.warmup):
            state, codes = eng.step(state)
            np.asarray(codes)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            state, codes = eng.step(state)
            np.asarray(codes)
            times.append(ms_since(t0))
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, codes = eng.step(state)
        np.asarray(codes)
        pipelined = ms_since(t0) / a.steps
        s = summary(times)
        positions = a.prompt_rows + 1 + a.warmup + 2 * a.steps
        fl = self.floor(variant, batch, weight_bytes, positions)
        self.out.emit("frame", variant=variant, batch=batch, **extra, **s, pipelined_ms=pipelined,
                      first_call_s=first_call_s, frames_per_s=batch * 1000 / s["median_ms"],
                      rtf=s["median_ms"] / FRAME_MS, floor_ms=fl["floor_ms"],
                      floor_static_kv_ms=fl["floor_static_kv_ms"],
                      floor_ratio=s["median_ms"] / fl["floor_ms"] if fl["floor_ms"] else None,
                      weight_bytes=weight_bytes, times_ms=times)
        return state

    # -- time to first audio -----------------------------------------------------------------------------
    def ttfa(self, variant: str, eng: Engine, batch: int, rows: int) -> None:
        a = self.args
        if rows + 1 > eng.max_seq_len:
            raise ValueError(f"a {rows}-row prompt does not fit {eng.max_seq_len} positions")
        prompt = make_prompt(rows, self.cfg32.num_codebooks, self.cfg32.text_vocab_size, a.seed + rows)
        dec = self.decoder(batch)
        parts: dict[str, list[float]] = {"prefill_ms": [], "step_ms": [], "mimi_ms": [], "ttfa_ms": []}
        first_call_s = None
        for rep in range(a.ttfa_repeats + 1):
            state = jax.block_until_ready(eng.init_state())
            dec.reset()
            jax.block_until_ready(dec.state)
            t0 = time.perf_counter()
            state = jax.block_until_ready(self.prefill(eng, state, [0], prompt))
            t1 = time.perf_counter()
            state, codes = eng.step(state)
            codes = np.asarray(codes)
            t2 = time.perf_counter()
            audio = np.asarray(dec.step(codes))
            t3 = time.perf_counter()
            assert audio.shape == (batch, self.mimi_cfg.frame_size), audio.shape
            del state
            if rep == 0:  # compiles this prompt's bucket (and, the first time, the decoder)
                first_call_s = t3 - t0
                continue
            for key, (u, v) in {"prefill_ms": (t0, t1), "step_ms": (t1, t2), "mimi_ms": (t2, t3),
                                "ttfa_ms": (t0, t3)}.items():
                parts[key].append(1000 * (v - u))
        s = summary(parts["ttfa_ms"])
        self.out.emit("ttfa", variant=variant, batch=batch, prompt_rows=rows, **s,
                      **{k: statistics.median(v) for k, v in parts.items() if k != "ttfa_ms"},
                      first_call_s=first_call_s, times_ms=parts["ttfa_ms"])

    # -- Mimi --------------------------------------------------------------------------------------------
    def mimi_decode(self, batch: int) -> None:
        a = self.args
        k = min(self.cfg32.num_codebooks, self.mimi_cfg.num_quantizers)
        codes = np.random.default_rng(a.seed).integers(0, self.mimi_cfg.codebook_size, (batch, k)).astype(np.int32)
        t0 = time.perf_counter()
        dec = self.decoder(batch)
        dec.reset()
        np.asarray(dec.step(codes))
        first_call_s = time.perf_counter() - t0
        for _ in range(a.warmup):
            np.asarray(dec.step(codes))
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            np.asarray(dec.step(codes))
            times.append(ms_since(t0))
        s = summary(times)
        self.out.emit("mimi_decode", batch=batch, codebooks=k, dtype=self.mimi_cfg.dtype, **s,
                      first_call_s=first_call_s, frames_per_s=batch * 1000 / s["median_ms"],
                      rtf=s["median_ms"] / FRAME_MS, times_ms=times)
        self.mimi_done.add(batch)

    # -- the serving frame -------------------------------------------------------------------------------
    def serving_frame(self, variant: str, eng: Engine, batch: int, state: Any) -> Any:
        a = self.args
        if state is None:
            prompt = make_prompt(a.prompt_rows, self.cfg32.num_codebooks, self.cfg32.text_vocab_size, a.seed)
            state = self.prefill(eng, eng.init_state(), list(range(batch)), prompt)
        dec = self.decoder(batch)
        dec.reset()
        total, step_ms, mimi_ms = [], [], []
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            state, codes = eng.step(state)
            codes = np.asarray(codes)
            t1 = time.perf_counter()
            audio = np.asarray(dec.step(codes))
            t2 = time.perf_counter()
            if i >= a.warmup:
                total.append(1000 * (t2 - t0))
                step_ms.append(1000 * (t1 - t0))
                mimi_ms.append(1000 * (t2 - t1))
        assert audio.shape == (batch, self.mimi_cfg.frame_size), audio.shape
        s = summary(total)
        self.out.emit("serving_frame", variant=variant, batch=batch, **s, step_ms=statistics.median(step_ms),
                      mimi_ms=statistics.median(mimi_ms), frames_per_s=batch * 1000 / s["median_ms"],
                      rtf=s["median_ms"] / FRAME_MS, realtime=s["median_ms"] < FRAME_MS, times_ms=total)
        return state


def environment(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    dev = jax.devices()[0]
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return {
        "mode": mode, "backend": jax.default_backend(), "device_kind": dev.device_kind, "device": str(dev),
        "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib_version,
        "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "stubbed_modules": STUBBED,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "args": {k: v for k, v in vars(args).items()},
        **({"note": "tiny configs: a smoke test of this script, not a benchmark"} if mode == "tiny" else {}),
    }


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny CSM/Mimi configs (the default on CPU)")
    size.add_argument("--full", action="store_true", help="CSM-1B + official Mimi (the default on an accelerator)")
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    ap.add_argument("--batches", type=parse_ints, help="batch sizes (default: full 1,4,16,64; tiny 1,2)")
    ap.add_argument("--fp32-batches", type=parse_ints, default=[1], help="batch sizes of the fp32 variant (1)")
    ap.add_argument("--variants", default="bf16,int8,fp32",
                    help=f"comma-separated, in this order, from {', '.join(VARIANTS)} (default bf16,int8,fp32)")
    ap.add_argument("--serving-variants", default="bf16,int8",
                    help="variants whose TTFA and serving frame are measured (default bf16,int8)")
    ap.add_argument("--ttfa-rows", type=parse_ints, default=[30, 250], help="prompt lengths for TTFA (30,250)")
    ap.add_argument("--ttfa-batches", type=parse_ints, default=[1], help="engine batch sizes for TTFA (1)")
    ap.add_argument("--prompt-rows", type=int, default=30, help="prompt rows before the timed frames (30)")
    ap.add_argument("--steps", type=int, help="timed steps per measurement (default: full 20, tiny 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps before them (default: full 3, tiny 1)")
    ap.add_argument("--ttfa-repeats", type=int, help="timed TTFA runs per prompt (default: full 5, tiny 2)")
    ap.add_argument("--bandwidth-gib", type=float, help="bandwidth probe array size (default: full 2, tiny 0.03)")
    ap.add_argument("--bandwidth-reps", type=int, default=10, help="back-to-back probe calls per timing (10)")
    ap.add_argument("--mimi-dtype", default="float32", help="Mimi compute dtype (float32, as the server runs it)")
    ap.add_argument("--time-budget-s", type=float,
                    help="start no new measurement after this many seconds (default: full 400, tiny 300)")
    ap.add_argument("--compile-cache", type=Path, help="persistent XLA compilation cache directory (reruns)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny or (not args.full and jax.default_backend() == "cpu") else "full"
    for key, value in (TINY if mode == "tiny" else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, parse_ints(value) if key == "batches" else value)
    args.variants = [v for v in args.variants.split(",") if v]
    args.serving_variants = [v for v in args.serving_variants.split(",") if v]
    unknown = sorted(set(args.variants + args.serving_variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if min(args.steps, args.ttfa_repeats, args.bandwidth_reps) < 1 or args.warmup < 0 or args.prompt_rows < 4:
        ap.error("--steps, --ttfa-repeats and --bandwidth-reps must be >= 1, --warmup >= 0, --prompt-rows >= 4")
    return args, mode


def main(argv: list[str] | None = None) -> int:
    args, mode = parse_args(argv)
    if args.compile_cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    out = Out(args.out)
    run = Runner(out, args.time_budget_s)
    cfg32 = tiny_csm() if mode == "tiny" else csm_1b()
    mimi_cfg = (tiny_mimi() if mode == "tiny" else MimiConfig()).replace(dtype=args.mimi_dtype)
    b = Bench(args, out, run, cfg32, mimi_cfg)
    try:
        run("env", lambda: out.emit("env", **environment(args, mode)), always=True)
        _measure(b)
    finally:
        out.emit("summary", mode=mode, wall_s=time.perf_counter() - T0, counts=dict(out.counts),
                 errors=run.errors, skipped_by_budget=run.skipped, time_budget_s=args.time_budget_s)
        out.close()
    return 0


def _measure(b: Bench) -> None:
    args, out, run, cfg32 = b.args, b.out, b.run, b.cfg32

    def probe(phase: str) -> None:
        r = bandwidth_probe(args.bandwidth_gib, args.bandwidth_reps)
        if phase == "start":
            b.bandwidth_gbps = r["gbps"]
        out.emit("bandwidth", phase=phase, **r)

    run("bandwidth", lambda: probe("start"), phase="start")

    # the floor of every variant and batch, from parameter shapes alone (nothing allocated)
    abstract = jax.eval_shape(init_fn(cfg32), jax.random.key(0))
    n_frame = frame_weights(abstract, cfg32, count)
    variant_batches = {v: (args.fp32_batches if v == "fp32" else args.batches) for v in args.variants}
    positions = args.prompt_rows + 1 + args.warmup + 2 * args.steps

    def floors() -> None:
        for v, batches in variant_batches.items():
            for batch in batches:
                fl = b.floor(v, batch, n_frame["frame"] * WEIGHT_ITEMSIZE[v], positions)
                out.emit("floor", variant=v, batch=batch, nominal_bytes_per_param=WEIGHT_ITEMSIZE[v],
                         params_read_per_frame=n_frame["frame"], bandwidth_gbps=b.bandwidth_gbps, **fl)

    run("floor", floors)

    def build_params() -> Any:
        t0 = time.perf_counter()
        params = jax.block_until_ready(jax.jit(init_fn(cfg32))(jax.random.key(args.seed)))
        out.emit("params", variant="fp32", build_s=time.perf_counter() - t0, n_params=count(params),
                 bytes=nbytes(params), params_read_per_frame=n_frame["frame"], weights_dtype=weights_dtype(params))
        return params

    params32 = run("params", build_params, variant="fp32")

    def build_codec() -> None:
        t0 = time.perf_counter()
        b.codec = MimiCodec.random(b.mimi_cfg, seed=args.seed + 1)
        jax.block_until_ready(b.codec.params)
        out.emit("codec", build_s=time.perf_counter() - t0, n_params=count(b.codec.params),
                 bytes=nbytes(b.codec.params), frame_size=b.mimi_cfg.frame_size,
                 num_quantizers=b.mimi_cfg.num_quantizers, dtype=b.mimi_cfg.dtype)

    run("codec", build_codec)
    if params32 is None:
        return

    for v in args.variants:
        batches = variant_batches[v]
        try:
            t0 = time.perf_counter()
            params, cfg = build_variant(v, params32, cfg32)
            params = jax.block_until_ready(params)
            build_s = time.perf_counter() - t0
        except Unsupported as e:
            for batch in batches:
                out.emit("frame", variant=v, batch=batch, skipped=str(e))
            continue
        except Exception as e:  # noqa: BLE001 (reported; the other variants still run)
            run.errors += 1
            out.emit("params", variant=v, error=f"{type(e).__name__}: {e}"[:2000])
            continue
        try:
            weight_bytes = frame_weights(params, cfg, nbytes)["frame"] if v != "bf16_f32w" else None
        except Exception:  # noqa: BLE001 (a quantized tree may not keep the float layout: fall back to the nominal size)
            weight_bytes = None
        weight_bytes = weight_bytes or n_frame["frame"] * WEIGHT_ITEMSIZE[v]
        extra = {"weights_dtype": weights_dtype(params), "compute_dtype": cfg.dtype}
        if v != "fp32":
            out.emit("params", variant=v, build_s=build_s, bytes=nbytes(params), weight_bytes_per_frame=weight_bytes,
                     **extra)
        serving = v in args.serving_variants
        for batch in batches:
            try:
                eng = Engine(params, cfg, batch)
            except Exception as e:  # noqa: BLE001 (reported; the other batch sizes still run)
                run.errors += 1
                out.emit("frame", variant=v, batch=batch, error=f"{type(e).__name__}: {e}"[:2000])
                continue
            state = run("frame", partial(b.frames, v, eng, batch, weight_bytes, extra), variant=v, batch=batch)
            if serving and batch in args.ttfa_batches:
                for rows in args.ttfa_rows:
                    run("ttfa", partial(b.ttfa, v, eng, batch, rows), variant=v, batch=batch, prompt_rows=rows)
            if serving and batch not in b.mimi_done:
                run("mimi_decode", partial(b.mimi_decode, batch), batch=batch)
            if serving:  # continues the frame measurement's rows (a fresh prefill if that one failed)
                run("serving_frame", partial(b.serving_frame, v, eng, batch, state), variant=v, batch=batch)
            del eng, state
            gc.collect()
        del params
        gc.collect()

    for batch in args.batches:  # Mimi at batch sizes no serving variant reached (e.g. only fp32 was asked)
        if batch not in b.mimi_done:
            run("mimi_decode", partial(b.mimi_decode, batch), batch=batch)
    run("bandwidth", lambda: probe("end"), phase="end")


if __name__ == "__main__":
    sys.exit(main())
