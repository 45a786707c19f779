"""Int8-weight products at decode sizes on XLA:CPU: which JAX formulation of y = x @ (W * s).T (W int8 [out, in],
per-output-channel float32 scales s [out], x float32 [rows, in]) runs closest to memory bandwidth at 1 and 4 rows
(B = 1 / 4), and how it compares with PyTorch's dynamic int8 Linear (`quantize_dynamic`, fbgemm) on the same shapes.

    .venv/bin/python bench/int8_kernels.py            # 4 shapes; XLA flag sets on 2 of them (~12 min, 2 busy cores)
    .venv/bin/python bench/int8_kernels.py --quick    # 2 shapes, 2 flag sets, fewer rounds (~3 min)

Measured per shape [out, in] (CSM-1B projections) and rows (1, 4), with the variants of `variants()`:
- `current`: csm_jax.csm.llama.linear today (CPU policy): multiply-reduce over `in`, float32 (4 rows: broadcast
  [rows, out, in] form); `current_T`: the same on a kernel stored [in, out]; `chunk16`: a blocked reduction;
  `bf16mulred`: the product in bfloat16, summed in float32;
- `q8dot`: activations quantised to int8 per row (dynamic, symmetric), an s8 x s8 -> s32 dot_general, both scales
  applied after; 1 row is padded to 2 (XLA hands YNNPACK only dots with >= 2 rows: `q8dot_nopad` shows the
  alternative); `q8x2dot`: two-level activation quantisation (x ~ q1 * a1 + q2 * a2, q2 quantising the rounding
  residual), the 2 levels as 2 rows of one dot: same weight traffic, ~100x smaller activation error; `q8dot_T`:
  kernel stored [in, out];
- `bf16dot` / `f32dot`: the kernel converted to bfloat16 / float32 inside the jit, then a dot (f32 accumulation);
- `torch_cb_int8`: a `jax.pure_callback` per product into torch's prepacked fbgemm kernel (1 torch thread);
- torch outside JAX: `torch_int8_dynamic_{1,2}t` (per-channel weights, activations quantised per call, 1 or 2
  threads) and `torch_f32_1t`;
- read bandwidth: sums over 128 MB (float32; int8 viewed as int32) in JAX and torch.
XLA_FLAGS are read when jax starts, so each flag set (`FLAG_SETS`) runs in its own subprocess; `current` runs in
each, and `x_current` (speed-up over it, same process) is comparable across them. Within a process the variants
are timed interleaved, round by round, min over rounds (those >4x slower than the best stop after 2 rounds). One
timed call chains the product over `copies` distinct weight copies (>= 128 MB: 4x the 32 MB L3, so weights come
from DRAM; >= 64 MB for `TEMPS`) inside one jit, as in a decode step; ms are per product. One process per shape.
Output: one JSON line per measurement (shape, rows, variant, flags, ms, GB/s of int8 weight read, rel_err: max abs
error over the std of the float64 reference x @ (W * s).T), then a summary table. Activations: N(0, 1) with 1% of
the channels x8 (outlier channels, which is what activation quantisation loses accuracy on).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

SHAPES: list[tuple[int, int]] = [(8192, 2048), (2048, 8192), (3072, 2048), (1024, 8192)]
FLAG_SHAPES: list[tuple[int, int]] = [(8192, 2048), (1024, 8192)]  # the shapes flag sets other than default run
ROWS = (1, 4)
STREAM_BYTES = 128 << 20  # weight bytes one timed call streams through (L3 is 32 MB)
YNN = "--xla_cpu_experimental_ynn_fusion_type"
# name -> XLA_FLAGS. jaxlib 0.10.2's defaults: YNNPACK fusions "individual_dot" (f32/bf16/s8 dots with >= 2 rows
# and columns) and "reduce" (reductions with their elementwise producers) on, XNNPACK fusions and oneDNN off.
FLAG_SETS: dict[str, str] = {
    "default": "",
    "no_ynn_dot": f"{YNN}=-individual_dot",
    "no_ynn_reduce": f"{YNN}=-reduce",
    "ynn_eltwise": f"{YNN}=+eltwise",  # converts feeding a dot join its YNNPACK fusion
    "xnn_fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "vec512_fastmath": "--xla_cpu_prefer_vector_width=512 --xla_cpu_enable_fast_math=true",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
}
FLAG_VARIANTS: dict[str, tuple[str, ...]] = {
    "default": ("current", "current_T", "chunk16", "bf16mulred", "q8dot", "q8x2dot", "q8dot_T", "q8dot_nopad",
                "bf16dot", "f32dot"),
    "no_ynn_dot": ("current", "q8dot", "q8x2dot", "f32dot"),
    "no_ynn_reduce": ("current", "current_T", "chunk16", "bf16mulred", "q8dot"),
    "ynn_eltwise": ("current", "q8dot", "q8x2dot", "bf16dot", "f32dot"),
    "xnn_fusions": ("current", "bf16mulred", "q8dot", "bf16dot", "f32dot"),
    "xnn_graph": ("current", "bf16mulred", "q8dot", "bf16dot", "f32dot"),
    "vec512_fastmath": ("current", "current_T", "chunk16", "bf16mulred", "q8dot"),
    "onednn": ("current", "q8dot", "bf16dot", "f32dot"),  # last: wrong results / aborts seen with this one
}
QUICK_FLAG_SETS = ("default", "ynn_eltwise")
# variants that can write out a converted kernel (XLA may keep one per copy): half the copies (>= 64 MB), less memory
TEMPS = ("current_T", "chunk16", "bf16mulred", "q8dot_nopad", "bf16dot", "f32dot")


# ------------------------------------------------------------------------------------------------ JAX variants

def variants() -> dict[str, tuple[Callable[..., Any], bool]]:
    """name -> (f(x [rows, in] f32, w, s [out]) -> y [rows, out] f32, whether w is stored [in, out])."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    nt, nn = (((1,), (1,)), ((), ())), (((1,), (0,)), ((), ()))

    def current(x, w, s):  # csm_jax.csm.llama.linear on CPU: 1 row; 2..32 rows the broadcast form
        if x.shape[0] == 1:
            return jnp.sum(w.astype(f32) * x.astype(f32), axis=-1)[None] * s
        return jnp.sum(w.astype(f32)[None] * x[:, None, :], axis=-1) * s

    def current_t(x, wt, s):
        if x.shape[0] == 1:
            return jnp.sum(wt.astype(f32) * x[0][:, None], axis=0)[None] * s
        return jnp.sum(wt.astype(f32)[None] * x[:, :, None], axis=1) * s

    def chunk16(x, w, s):  # [rows, out, in/16, 16] -> partial sums [rows, out, 16] -> [rows, out]
        r, (o, i) = x.shape[0], w.shape
        p = w.astype(f32).reshape(1, o, i // 16, 16) * x.reshape(r, 1, i // 16, 16)
        return jnp.sum(jnp.sum(p, axis=2), axis=-1) * s

    def bf16mulred(x, w, s):  # int8 is exact in bfloat16; products rounded to bf16, summed in float32
        if x.shape[0] == 1:
            return jnp.sum(w.astype(jnp.bfloat16) * x.astype(jnp.bfloat16), axis=-1, dtype=f32)[None] * s
        return jnp.sum(w.astype(jnp.bfloat16)[None] * x.astype(jnp.bfloat16)[:, None, :], axis=-1, dtype=f32) * s

    def quant(x):  # per-row symmetric int8: x ~ q * a
        a = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) / 127.0
        return jnp.round(x / a).astype(jnp.int8), a

    def i8dot(q, w, dims):
        return jax.lax.dot_general(q, w, dims, preferred_element_type=jnp.int32).astype(f32)

    def q8(dims, pad=True):
        def f(x, w, s):
            q, a = quant(x)
            r = x.shape[0]
            if r == 1 and pad:  # YNNPACK takes dots of >= 2 rows; 1 row is a dot on an int32 copy of w
                q = jnp.pad(q, ((0, 1), (0, 0)))
            return i8dot(q, w, dims)[:r] * a * s
        return f

    def q8x2(x, w, s):
        q1, a1 = quant(x)
        q2, a2 = quant(x - q1.astype(f32) * a1)
        r = x.shape[0]
        y = i8dot(jnp.concatenate([q1, q2]), w, nt)
        return (y[:r] * a1 + y[r:] * a2) * s

    def bf16dot(x, w, s):
        return jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), nt, preferred_element_type=f32) * s

    def f32dot(x, w, s):  # `linear`'s dot path
        return jax.lax.dot_general(x, w.astype(f32), nt, preferred_element_type=f32) * s

    return {"current": (current, False), "current_T": (current_t, True), "chunk16": (chunk16, False),
            "bf16mulred": (bf16mulred, False), "q8dot": (q8(nt), False), "q8x2dot": (q8x2, False),
            "q8dot_T": (q8(nn), True), "q8dot_nopad": (q8(nt, pad=False), False), "bf16dot": (bf16dot, False),
            "f32dot": (f32dot, False)}


def chained(f: Callable[..., Any], copies: int) -> Callable[..., Any]:
    """One jit applying f over `copies` weight copies in sequence (each input depends on the previous output)."""
    import jax
    import jax.numpy as jnp

    def run(x, ws, ss):
        ys = []
        for i in range(copies):
            x, w = jax.lax.optimization_barrier((x, ws[i]))  # no work on w before x is ready (bounded temporaries)
            y = f(x, w, ss[i])
            ys.append(y)
            x = x + 1e-30 * jnp.sum(y, axis=-1, keepdims=True)  # a true dependency that leaves x unchanged
        return ys

    return jax.jit(run)


def timed_rounds(calls: dict[str, Callable[[], Any]], rounds: int, per: dict[str, int],
                 setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Min over `rounds` of one call of each (interleaved), in ms per product; `setup[k]` runs untimed first."""
    setup = setup or {}
    best = {k: math.inf for k in calls}
    live = list(calls)
    for k in live:  # warm-up
        setup.get(k, lambda: None)()
        calls[k]()
    for rnd in range(rounds):
        if rnd == 2:  # far slower than the best: 2 rounds are enough
            live = [k for k in live if best[k] <= 4 * min(best.values())]
        for k in live:
            setup.get(k, lambda: None)()
            t = time.perf_counter()
            calls[k]()
            best[k] = min(best[k], (time.perf_counter() - t) * 1e3 / per[k])
    return best


def emit(rec: dict[str, Any]) -> None:
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------------ worker

def data(out: int, n_in: int, rows: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (out, n_in), dtype=np.int8)
    s = (rng.uniform(0.5, 1.5, out) * 0.02 / 127).astype(np.float32)
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    x[:, rng.choice(n_in, n_in // 100, replace=False)] *= 8.0  # outlier channels
    ref = x.astype(np.float64) @ (w.T * s.astype(np.float64))
    return w, s, x, ref


def bandwidth(rounds: int) -> None:
    """Read bandwidth: sums over 128 MB (int8: 64 MB) in JAX (float32; int8 widened to int32) and torch (float32;
    int8, which torch sums in int64), torch at 1 and 2 threads."""
    import jax
    import jax.numpy as jnp
    import torch

    n, n8 = 128 << 20, 64 << 20  # widening int8 sums may write their whole input out at 4-8 bytes per element
    j32, j8 = jnp.ones(n // 4, jnp.float32), jnp.ones(n8, jnp.int8)
    t32, t8 = torch.ones(n // 4), torch.ones(n8, dtype=torch.int8)
    f32s, f8s = jax.jit(jnp.sum), jax.jit(lambda a: jnp.sum(a.astype(jnp.int32)))
    calls = {"jax_sum_f32": lambda: f32s(j32).block_until_ready(), "jax_sum_int8": lambda: f8s(j8).block_until_ready()}
    setup = {}
    for th in (1, 2):
        calls |= {f"torch_sum_f32_{th}t": lambda: t32.sum(), f"torch_sum_int8_{th}t": lambda: t8.sum()}
        setup |= {f"torch_sum_f32_{th}t": lambda th=th: torch.set_num_threads(th),
                  f"torch_sum_int8_{th}t": lambda th=th: torch.set_num_threads(th)}
    ms = timed_rounds(calls, rounds, {k: 1 for k in calls}, setup)
    for k, v in ms.items():
        nbytes = n8 if "int8" in k else n
        emit({"kind": "bandwidth", "variant": k, "ms": round(v, 3), "GBps": round(nbytes / v / 1e6, 2)})


def torch_calls(ws: list, s, x, out: int, n_in: int, copies: int):
    """torch's dynamic int8 Linear (per-channel) and float32 Linear over the weight copies, and a JAX chain calling
    the same prepacked kernels through pure_callback. Returns (calls, per, setup, first outputs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = "fbgemm"
    mods_q = []
    for a in ws:
        lin = torch.nn.Sequential(torch.nn.Linear(n_in, out, bias=False))
        with torch.no_grad():
            lin[0].weight.copy_(torch.from_numpy(a.astype(np.float32) * s[:, None]))
        mods_q.append(quantize_dynamic(lin, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True))
    mods_f = []
    for i in range(max(2, math.ceil(STREAM_BYTES / (4 * out * n_in)))):
        lin = torch.nn.Linear(n_in, out, bias=False)
        if i == 0:
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(ws[0].astype(np.float32) * s[:, None]))
        mods_f.append(lin)
    tx = torch.from_numpy(x)

    def chain(mods):
        def c():
            with torch.inference_mode():
                xx = tx
                for m in mods:
                    xx = xx + 1e-30 * m(xx).sum(-1, keepdim=True)
        return c

    packed = [m[0]._packed_params._packed_params for m in mods_q]

    def host(i):
        return lambda v: torch.ops.quantized.linear_dynamic(torch.from_numpy(np.array(v)), packed[i], True).numpy()

    hosts = [host(i) for i in range(copies)]
    spec = jax.ShapeDtypeStruct((x.shape[0], out), jnp.float32)

    def cb(xv):
        ys = []
        for h in hosts:
            y = jax.pure_callback(h, spec, xv)
            ys.append(y)
            xv = xv + 1e-30 * jnp.sum(y, axis=-1, keepdims=True)
        return ys

    cbj, xj = jax.jit(cb), jnp.asarray(x)
    one = lambda: torch.set_num_threads(1)
    with torch.inference_mode():
        torch.set_num_threads(1)
        first = {"torch_int8_dynamic_1t": mods_q[0](tx).numpy(), "torch_f32_1t": mods_f[0](tx).numpy(),
                 "torch_cb_int8": np.asarray(cbj(xj)[0])}
    first["torch_int8_dynamic_2t"] = first["torch_int8_dynamic_1t"]
    calls = {"torch_cb_int8": lambda: jax.block_until_ready(cbj(xj)), "torch_int8_dynamic_1t": chain(mods_q),
             "torch_int8_dynamic_2t": chain(mods_q), "torch_f32_1t": chain(mods_f)}
    per = {"torch_cb_int8": copies, "torch_int8_dynamic_1t": copies, "torch_int8_dynamic_2t": copies,
           "torch_f32_1t": len(mods_f)}
    setup = {"torch_cb_int8": one, "torch_int8_dynamic_1t": one, "torch_f32_1t": one,
             "torch_int8_dynamic_2t": lambda: torch.set_num_threads(2)}
    return calls, per, setup, first


def rss_mb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS"))


def worker(flag_set: str, shapes: list[tuple[int, int]], rounds: int, names: list[str], with_torch: bool) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    allv = variants()
    for out, n_in in shapes:
        copies = max(2, math.ceil(STREAM_BYTES / (out * n_in)))
        for rows in ROWS:
            w, s, x, ref = data(out, n_in, rows)
            rng = np.random.default_rng(1)
            ws = [w] + [rng.integers(-127, 128, w.shape, dtype=np.int8) for _ in range(copies - 1)]
            wj = [jnp.asarray(a) for a in ws]
            wtj = [jnp.asarray(np.ascontiguousarray(a.T)) for a in ws] if any(allv[n][1] for n in names) else None
            sj, xj = [jnp.asarray(s)] * copies, jnp.asarray(x)
            calls, per, setup, first = {}, {}, {}, {}
            for name in names:
                if name == "q8dot_nopad" and rows > 1:
                    continue  # the same as q8dot
                f, transposed = allv[name]
                wl = wtj if transposed else wj
                first[name] = np.asarray(jax.jit(f)(xj, wl[0], sj[0]))
                n = max(2, copies // 2) if name in TEMPS else copies
                g = chained(f, n)
                calls[name] = (lambda g=g, wl=wl[:n], xj=xj, sj=sj: jax.block_until_ready(g(xj, wl, sj)))
                per[name] = n
            if with_torch:
                c, p, su, fi = torch_calls(ws, s, x, out, n_in, copies)
                calls, per, setup, first = calls | c, per | p, setup | su, first | fi
            del ws
            ms = timed_rounds(calls, rounds, per, setup)
            sd = ref.std()
            for name, v in ms.items():
                err = np.abs(first[name].astype(np.float64) - ref)
                nbytes = out * n_in * (4 if name.startswith("torch_f32") else 1)
                emit({"kind": "matvec", "shape": [out, n_in], "rows": rows, "variant": name, "flags": flag_set,
                      "ms": round(v, 4), "GBps": round(nbytes / v / 1e6, 2),
                      "x_current": round(ms["current"] / v, 3) if "current" in ms else None,
                      "rel_err": float(f"{err.max() / sd:.3g}"),
                      "rms_err": float(f"{np.sqrt((err ** 2).mean()) / sd:.3g}"),
                      "copies": per[name]})
            del calls, wj, wtj, setup, first
            gc.collect()
            jax.clear_caches()
            emit({"kind": "rss", "shape": [out, n_in], "rows": rows, "rss_MB": rss_mb()})


# ------------------------------------------------------------------------------------------------ driver

def summary(recs: list[dict[str, Any]]) -> None:
    nan = float("nan")
    bw = {r["variant"]: r["GBps"] for r in recs if r.get("kind") == "bandwidth"}
    if bw:
        print("\nread bandwidth (GB/s): " + ", ".join(f"{k} {v}" for k, v in bw.items()))
    mv = [r for r in recs if r.get("kind") == "matvec"]
    rates = list(bw.values()) + [r["GBps"] for r in mv]
    floor_bw = max(rates) if rates else nan
    print(f"floor bandwidth: {floor_bw} GB/s, the best read rate seen (bandwidth probes and products alike)")
    groups = list(dict.fromkeys((tuple(r["shape"]), r["rows"]) for r in mv))
    print(f"\ndefault XLA flags\n{'shape':>10} {'rows':>4} {'variant':<21} {'ms':>7} {'GB/s':>6} {'x_cur':>6} "
          f"{'x_t8_1t':>7} {'x_t8_2t':>7} {'x_floor':>7} {'rel_err':>8} {'rms_err':>8}")
    for shape, rows in groups:
        grp = [r for r in mv if (tuple(r["shape"]), r["rows"]) == (shape, rows) and r["flags"] == "default"]
        floor = shape[0] * shape[1] / floor_bw / 1e6
        t1 = next((r["ms"] for r in grp if r["variant"] == "torch_int8_dynamic_1t"), nan)
        t2 = next((r["ms"] for r in grp if r["variant"] == "torch_int8_dynamic_2t"), nan)
        for r in sorted(grp, key=lambda r: r["ms"]):
            print(f"{'x'.join(map(str, shape)):>10} {rows:>4} {r['variant']:<21} {r['ms']:>7.3f} {r['GBps']:>6.2f} "
                  f"{r['x_current'] or nan:>6.2f} {t1 / r['ms']:>7.2f} {t2 / r['ms']:>7.2f} {r['ms'] / floor:>7.2f} "
                  f"{r['rel_err']:>8.2e} {r['rms_err']:>8.2e}")
    flag_sets = [f for f in dict.fromkeys(r["flags"] for r in mv)]
    if len(flag_sets) > 1:
        print("\nXLA flag sets: ms (speed-up over `current` in the same process); '-': not run or the process died")
        print(f"{'shape':>10} {'rows':>4} {'variant':<11} " + " ".join(f"{f[:15]:>15}" for f in flag_sets))
        for shape, rows in groups:
            grp = [r for r in mv if (tuple(r["shape"]), r["rows"]) == (shape, rows)]
            names = [n for n in dict.fromkeys(r["variant"] for r in grp if not r["variant"].startswith("torch"))
                     if sum(r["variant"] == n for r in grp) > 1]
            for n in names:
                cells = []
                for f in flag_sets:
                    r = next((r for r in grp if r["variant"] == n and r["flags"] == f), None)
                    cells.append(f"{r['ms']:.2f} ({r['x_current']:.2f})" if r else "-")
                print(f"{'x'.join(map(str, shape)):>10} {rows:>4} {n:<11} " + " ".join(f"{c:>15}" for c in cells))
    print("\nx_cur: speed-up over `current` (same process); x_t8_1t / x_t8_2t: speed-up over torch dynamic int8 with "
          "1 / 2 threads; x_floor: ms over the time to read the int8 weight at the floor bandwidth; rel_err / rms_err: "
          "max / rms abs error over the reference's std")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 shapes, 2 flag sets, 4 rounds")
    ap.add_argument("--rounds", type=int, help="timing rounds (default 7, quick 4)")
    ap.add_argument("--flags", nargs="*", choices=list(FLAG_SETS), help="flag sets to run (default: all / quick's)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--variants", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 7)
    if args.worker:  # a subprocess, XLA_FLAGS set by the parent
        warnings.filterwarnings("ignore")  # torch.ao.quantization's deprecation notices
        if args.shapes == "bandwidth":
            bandwidth(rounds)
        else:
            shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
            worker(args.worker, shapes, rounds, args.variants.split(","), with_torch=args.worker == "default")
        emit({"kind": "worker", "flags": args.worker, "job": args.shapes,
              "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})
        return
    flag_sets = args.flags or list(QUICK_FLAG_SETS if args.quick else FLAG_SETS)
    recs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (timings get noisy above ~0.5)", flush=True)
    jobs = [("default", "bandwidth")] if "default" in flag_sets else []  # one process per job: bounded memory
    for fs in flag_sets:
        jobs += [(fs, f"{o}x{i}") for o, i in (FLAG_SHAPES if args.quick or fs != "default" else SHAPES)]
    for fs, what in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", fs, "--variants", ",".join(FLAG_VARIANTS[fs]),
               "--rounds", str(rounds), "--shapes", what]
        print(f"# flag set {fs} ({what}): XLA_FLAGS={FLAG_SETS[fs]!r}", flush=True)
        proc = subprocess.Popen(cmd, env=dict(os.environ, XLA_FLAGS=FLAG_SETS[fs], JAX_PLATFORMS="cpu"),
                                stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                recs.append(json.loads(line))
        if proc.wait():
            print(f"# flag set {fs} ({what}): worker exited with {proc.returncode}", flush=True)
    summary(recs)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
