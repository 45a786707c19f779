"""CSM training throughput: transformers vs csm-jax, same config, same weights, same batch, same run.

Run from the repository root:

    .venv/bin/python bench/train_bench.py                          # --size small: B=4, S=256 (~70 s on 2 idle cores)
    .venv/bin/python bench/train_bench.py --size small --steps 10 --json train_bench.json
    .venv/bin/python bench/train_bench.py --size tiny --steps 2     # smoke test of the script (seconds)
    .venv/bin/python bench/train_bench.py --size 1b                 # CSM-1B, B=1, S=128: needs ~53 GiB free RAM

A transformers `CsmForConditionalGeneration` of the chosen size (fp32, CSM's llama3 RoPE, every backbone / depth /
head weight redrawn from a seeded generator so the logits are far from flat; a tiny unused Mimi codec) is saved
with `save_pretrained` to a temporary directory; csm-jax loads it with `load_csm_params`, transformers with
`from_pretrained`. One batch (`synthetic_batch`: per sequence a text turn, a context audio turn ending in its
all-zero end frame, then the target audio turn and its end frame; no padding) is used by both sides at every step.

One training step on each side:
- transformers (`model.train()`): the input embeddings are built inside the step as
  `_merge_input_ids_with_input_values` builds them (`embed_text_tokens` on text rows,
  `backbone_model.embed_tokens` - the sum of the K codebook embeddings - on audio rows), then
  `model(inputs_embeds=..., labels=...)` with labels [B, S, K]: -100 everywhere except codebook 0 of every target
  frame (the backbone loss) and codebooks 1..K-1 of the depth-decoder frames (what the processor's
  `depth_decoder_labels_ratio` leaves; the other target frames get -101, which the merge turns into -100 on
  codebooks 1..K-1, as here); `loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW.step()`,
  `zero_grad()`. The audio codes are given directly, i.e. the codec encode of the
  processor path (`input_values`) is not part of the step. Attention: eager and sdpa are both timed (forward +
  backward, no update, alternating) and the one with the lower minimum is used; likewise the foreach / fused /
  for-loop AdamW implementations (`step()` on real gradients with lr 0); torch threads = usable cores.
- csm-jax: `TrainProgram.train_step` (jitted, fp32, state donated), `LossConfig(depth_fraction=1/16)`, AdamW.

Both sides run the depth decoder on the same frames: csm-jax draws them inside its step from the state's key and
the step number, and the bench draws them the same way (`select_depth_frames` on the same key) to build the
transformers labels of that step. So the losses (codebook 0, depth decoder, total) and the gradient norm of the
first step must agree to float32 rounding (transformers' gradient norm is `clip_grad_norm_`'s float32 norm, which
is ~1e-4 off at 1e8 parameters; csm-jax's matches a float64 norm); they are printed with their relative
differences, and again for the last step (after identical AdamW updates: same lr schedule, betas (0.9, 0.95), eps
1e-8, weight decay 0.01 on matrices only, global-norm clip 1.0).

Steps 0..warmup-1 are untimed (step 0 includes csm-jax's compilation, reported apart); then the sides alternate
step by step (order swapped each step) for --steps timed steps each. Reported: min/median ms per step, target
audio frames per second (frames with a codebook-0 loss per step / median step time), rows per second, and the
ratio transformers median / csm-jax median. Run on an idle machine: the load average and the cores other
processes used during the timed steps are printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers.models.csm.modeling_csm import CsmCodebooksHead, CsmRMSNorm

from bench_env import environment, print_environment
from csm_jax.csm import CsmConfig, load_csm_params
from csm_jax.training import LossConfig, OptimConfig, TrainProgram
from csm_jax.training.loss import eligible_frames, select_depth_frames
from csm_jax.training.state import boxed_abstract_params
from csm_jax.training.synthetic import synthetic_batch
from generate_bench import OtherLoad, peak_rss_gb

# CSM-1B's llama3 RoPE in torchtune's form
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, audio_token_id=None, audio_eos_token_id=None)
TINY_MIMI = dict(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8, codebook_dim=8, vector_quantization_hidden_dimension=8,
                 codebook_size=16, upsample_groups=16, sliding_window=6)
# backbone / depth: transformers config fields (None: CsmConfig() defaults, i.e. CSM-1B)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(codebooks=8, audio_vocab=64, text_vocab=256, batch=2, seq=32,
                 backbone=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128),
                 depth=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64)),
    "small": dict(codebooks=32, audio_vocab=2051, text_vocab=128_256, batch=4, seq=256,
                  backbone=dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                intermediate_size=2048),
                  depth=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=1024)),
    "1b": dict(codebooks=32, audio_vocab=2051, text_vocab=128_256, batch=1, seq=128, backbone=None, depth=None),
}
ATTENTION = ("eager", "sdpa")
ADAMW = ("foreach", "fused", "loop")
# AdamW and schedule of both sides (the lr of each step is taken from csm-jax's schedule)
OPTIM = OptimConfig(learning_rate=3e-4, warmup_steps=0, decay_steps=10_000, end_lr_ratio=0.1, b1=0.9, b2=0.95,
                    eps=1e-8, weight_decay=0.01, clip_norm=1.0)


# --------------------------------------------------------------------------------------------- setup ---
def hf_config(size: str) -> transformers.CsmConfig:
    s = SIZES[size]
    k = s["codebooks"]
    backbone = s["backbone"] or {}
    depth = transformers.CsmDepthDecoderConfig(
        num_codebooks=k, vocab_size=s["audio_vocab"], rope_parameters=ROPE, **(s["depth"] or {}),
        **({"backbone_hidden_size": backbone["hidden_size"]} if backbone else {}))
    return transformers.CsmConfig(
        num_codebooks=k, vocab_size=s["audio_vocab"], text_vocab_size=s["text_vocab"], rope_parameters=ROPE,
        depth_decoder_config=depth, codec_config=transformers.MimiConfig(num_quantizers=k, **TINY_MIMI),
        attn_implementation="eager", **NO_SPECIAL_TOKENS, **backbone)


def randomize_(model: transformers.CsmForConditionalGeneration, seed: int) -> None:
    """Redraw every non-codec weight: linear layers and codebook heads ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    RMSNorm weights ~ U(0.5, 1.5). transformers' default init (std 0.02) gives nearly flat logits (loss ~ log V),
    which would make the loss comparison much less telling. The tied audio table is drawn once."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if name.startswith("codec_model") or not isinstance(w, torch.Tensor) or id(w) in seen:
                continue
            seen.add(id(w))
            if isinstance(module, torch.nn.Linear):
                w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]), generator=gen)
            elif isinstance(module, torch.nn.Embedding):
                w.normal_(0.0, 1.0, generator=gen)
            elif isinstance(module, CsmRMSNorm):
                w.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(module, CsmCodebooksHead):  # [K-1, hidden, vocab]
                w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]), generator=gen)
            else:
                raise AssertionError(f"unexpected weighted module {name}: {type(module).__name__}")


def build_checkpoint(path: Path, size: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.CsmForConditionalGeneration(hf_config(size))
    randomize_(model, seed + 1)
    model.save_pretrained(path)
    del model
    gc.collect()


def trainable_hf_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """Everything but the codec (each tied tensor once)."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("codec_model.")]


def count_jax_params(cfg: CsmConfig) -> int:
    abstract = jax.tree.leaves(boxed_abstract_params(cfg), is_leaf=lambda x: hasattr(x, "shape"))
    return sum(int(np.prod(getattr(x, "value", x).shape)) for x in abstract)


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# --------------------------------------------------------------------------------------------- batch ---
def make_batch(cfg: CsmConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Full-length sequences (no padding rows): text turn, context audio turn, target audio turn + end frame."""
    data = synthetic_batch(cfg, batch, seq, rng=seed, lengths=[seq] * batch)
    k, mask = cfg.num_codebooks, data["mask"]
    audio, text = mask[..., :k], mask[..., k]
    # every row is either text (column K only) or a whole audio frame: the two kinds transformers' merge builds
    assert np.all(audio.all(-1) ^ text) and np.all(audio.all(-1) | ~audio.any(-1)), "unexpected row layout"
    return data


def torch_inputs(data: dict[str, np.ndarray], k: int) -> dict[str, torch.Tensor]:
    tokens, mask = data["tokens"], data["mask"]
    return {
        "codes": torch.from_numpy(np.where(mask[..., :k], tokens[..., :k], 0).astype(np.int64)),  # [B, S, K]
        "text": torch.from_numpy(np.where(mask[..., k], tokens[..., k], 0).astype(np.int64)),  # [B, S]
        "is_audio": torch.from_numpy(mask[..., 0].copy()),  # [B, S]
    }


def jax_depth_frames(rng: np.ndarray, step: int, data: dict[str, np.ndarray], loss_cfg: LossConfig
                     ) -> list[tuple[int, int]]:
    """The (b, t) frames csm-jax's train step `step` gives to the depth decoder: the same draw as
    `make_train_fn` (grad_accum 1): key = fold_in(state.rng, step), split in one micro-batch key, vmapped
    `select_depth_frames` over the whole batch as the one micro-batch."""
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), step)
    micro = {name: jnp.asarray(data[name])[None] for name in ("tokens", "mask", "targets")}
    bi, ti, valid = jax.vmap(lambda kk, mb: select_depth_frames(kk, eligible_frames(mb), loss_cfg))(
        jax.random.split(key, 1), micro)
    return [(int(b), int(t)) for b, t, v in zip(np.asarray(bi[0]), np.asarray(ti[0]), np.asarray(valid[0])) if v]


def hf_labels(data: dict[str, np.ndarray], codes: torch.Tensor, frames: list[tuple[int, int]]) -> torch.Tensor:
    """[B, S, K] int64: codebook 0 on every eligible target frame (row t >= 1, predicted from row t - 1),
    codebooks 1..K-1 on the depth frames, -100 elsewhere."""
    eligible = torch.from_numpy(np.array(eligible_frames(data)))
    labels = torch.full_like(codes, -100)
    labels[..., 0] = torch.where(eligible, codes[..., 0], -100)
    for b, t in frames:
        assert eligible[b, t], (b, t)
        labels[b, t, 1:] = codes[b, t, 1:]
    return labels


# --------------------------------------------------------------------------------------------- steps ---
def make_optimizer(model: Any, kind: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in trainable_hf_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": OPTIM.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opts = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(groups, lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps, **opts)


def hf_forward_backward(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> Any:
    text = model.embed_text_tokens(inputs["text"])  # [B, S, D]
    audio = model.backbone_model.embed_tokens(inputs["codes"])  # [B, S, D]: sum of the K codebook embeddings
    embeds = torch.where(inputs["is_audio"][..., None], audio, text)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    return out


def hf_step(model: Any, opt: torch.optim.Optimizer, params: list[torch.Tensor], inputs: dict[str, torch.Tensor],
            labels: torch.Tensor, lr: float) -> dict[str, float]:
    """One full training step; returns its losses and the gradient norm (before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = hf_forward_backward(model, inputs, labels)
    norm = torch.nn.utils.clip_grad_norm_(params, OPTIM.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": out.loss.item(), "c0_loss": out.backbone_loss.item(), "depth_loss": out.depth_decoder_loss.item(),
            "grad_norm": norm.item()}


def probe_attention(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, repeats: int
                    ) -> dict[str, list[float]]:
    """ms of forward + backward (no update; gradients dropped) per attention implementation, alternating the
    implementations round by round (round 0 untimed)."""
    out: dict[str, list[float]] = {impl: [] for impl in ATTENTION}
    for i in range(repeats + 1):
        for impl in ATTENTION if i % 2 == 0 else ATTENTION[::-1]:
            model.set_attn_implementation(impl)
            t0 = time.perf_counter()
            hf_forward_backward(model, inputs, labels)
            if i:
                out[impl].append(1000 * (time.perf_counter() - t0))
            model.zero_grad(set_to_none=True)
    return out


def probe_adamw(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, repeats: int
                ) -> dict[str, list[float]]:
    """ms of one `AdamW.step()` per implementation, on real gradients, with lr 0 (so the weights do not move) and a
    throw-away optimizer each (its moments are discarded); round 0 untimed."""
    hf_forward_backward(model, inputs, labels)
    out: dict[str, list[float]] = {}
    for kind in ADAMW:
        opt = make_optimizer(model, kind)
        for group in opt.param_groups:
            group["lr"] = 0.0
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.step()
            if i:
                times.append(1000 * (time.perf_counter() - t0))
        out[kind] = times
        del opt
        gc.collect()
    model.zero_grad(set_to_none=True)
    return out


def jax_step(program: TrainProgram, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, float]]:
    state, metrics = program.train_step(state, batch)
    metrics = jax.device_get(metrics)  # waits for the step
    jax.block_until_ready(state)
    return state, {name: float(metrics[name]) for name in ("loss", "c0_loss", "depth_loss", "grad_norm",
                                                           "c0_frames", "depth_frames", "lr")}


# ------------------------------------------------------------------------------------------- report ---
def stats(times: list[float]) -> dict[str, Any]:
    return {"min_ms": min(times), "median_ms": statistics.median(times), "max_ms": max(times), "times_ms": times}


def compare(hf: dict[str, float], jx: dict[str, float]) -> dict[str, Any]:
    keys = ("c0_loss", "depth_loss", "loss", "grad_norm")
    return {"hf": {k: hf[k] for k in keys}, "jax": {k: jx[k] for k in keys},
            "rel_diff": {k: abs(hf[k] - jx[k]) / max(abs(jx[k]), 1e-30) for k in keys}}


def print_compare(title: str, c: dict[str, Any]) -> None:
    print(f"{title}:")
    for k in ("c0_loss", "depth_loss", "loss", "grad_norm"):
        print(f"  {k:<10} transformers {c['hf'][k]:.7f} | csm-jax {c['jax'][k]:.7f} | rel diff "
              f"{c['rel_diff'][k]:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--batch", type=int, help="sequences per batch (default: tiny 2, small 4, 1b 1)")
    ap.add_argument("--seq", type=int, help="frames (rows) per sequence (default: tiny 32, small 256, 1b 128)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first, >= 1 (default 2)")
    ap.add_argument("--depth-fraction", type=float, default=1 / 16,
                    help="csm-jax LossConfig.depth_fraction: depth-decoder frames = ceil(fraction * B * S)")
    ap.add_argument("--attn", choices=("auto", *ATTENTION), default="auto",
                    help="transformers attention (auto: time both, use the faster)")
    ap.add_argument("--probe", type=int, default=2,
                    help="timed forward+backward passes per attention / AdamW steps per implementation in auto")
    ap.add_argument("--adamw", choices=("auto", *ADAMW), default="auto",
                    help="torch.optim.AdamW implementation (auto: time each, use the fastest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds MemAvailable")
    ap.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = ap.parse_args()
    s = SIZES[args.size]
    batch_size, seq = args.batch or s["batch"], args.seq or s["seq"]
    if args.steps < 1 or args.warmup < 1 or batch_size < 1 or seq < 8:
        ap.error("--steps >= 1, --warmup >= 1, --batch >= 1 and --seq >= 8 required")
    t_start = time.perf_counter()

    cores = len(os.sched_getaffinity(0))
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    load = print_environment()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    hf_cfg = hf_config(args.size)
    jcfg = CsmConfig.from_hf(hf_cfg.to_dict())
    n_params = count_jax_params(jcfg)
    # transformers: weights, grads, 2 Adam moments; csm-jax: weights, 2 moments, grads and update temporaries
    need_gb = n_params * 4 * (4 + 5) / 2**30 + 1.0
    avail = mem_available_gb()
    print(f"size {args.size}: {n_params / 1e6:.1f} M parameters (fp32); estimated memory for both sides "
          f"{need_gb:.1f} GiB, available {avail:.1f} GiB")
    if need_gb > avail and not args.force:
        print(f"not enough memory for --size {args.size} (pass --force to try anyway)")
        sys.exit(3)

    with tempfile.TemporaryDirectory(prefix="train_bench_", dir="/tmp") as tmp:
        t0 = time.perf_counter()
        build_checkpoint(Path(tmp), args.size, args.seed)
        t1 = time.perf_counter()
        params, loaded_cfg = load_csm_params(tmp)
        hf = transformers.CsmForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager")
        with torch.no_grad():  # own the memory (from_pretrained may map the file, which is deleted next)
            for t in [*hf.parameters(), *hf.buffers()]:
                t.data = t.data.clone()
        t2 = time.perf_counter()
    assert loaded_cfg == jcfg, (loaded_cfg, jcfg)
    hf.train()
    hf_params = [p for _, p in trainable_hf_parameters(hf)]
    n_hf = sum(p.numel() for p in hf_params)
    assert n_hf == n_params, (n_hf, n_params)
    assert all(p.dtype == torch.float32 for p in hf_params) and jcfg.compute_dtype == jnp.float32
    bb, dd = jcfg.backbone, jcfg.decoder
    print(f"backbone {bb.hidden_size} wide x {bb.num_layers} layers ({bb.num_heads}/{bb.num_kv_heads} heads, MLP "
          f"{bb.intermediate_size}), depth decoder {dd.hidden_size} x {dd.num_layers} ({dd.num_heads}/"
          f"{dd.num_kv_heads} heads, MLP {dd.intermediate_size}), {jcfg.num_codebooks} codebooks of "
          f"{jcfg.audio_vocab_size}, text vocab {jcfg.text_vocab_size}; built and saved in {t1 - t0:.1f} s, loaded "
          f"by both in {t2 - t1:.1f} s")

    k = jcfg.num_codebooks
    data = make_batch(jcfg, batch_size, seq, args.seed)
    inputs = torch_inputs(data, k)
    loss_cfg = LossConfig(depth_fraction=args.depth_fraction)
    program = TrainProgram(jcfg, loss_cfg, OPTIM)
    state = program.init_state(jax.random.key(args.seed), params)
    del params
    rng = np.asarray(state.rng)
    total = args.warmup + args.steps
    frames = [jax_depth_frames(rng, i, data, loss_cfg) for i in range(total)]
    labels = [hf_labels(data, inputs["codes"], f) for f in frames]
    lrs = [float(program.schedule(i)) for i in range(total)]
    batch = program.shard_batch(data)
    target_frames = int(np.asarray(eligible_frames(data)).sum())
    print(f"batch: B={batch_size} x S={seq} rows ({int(data['mask'][..., k].sum())} text rows, "
          f"{int(data['mask'][..., 0].sum())} audio rows), {target_frames} target frames (codebook-0 loss), "
          f"{len(frames[0])} depth-decoder frames per step (depth_fraction {args.depth_fraction:g} of B*S)")

    probe: dict[str, list[float]] = {}
    attn = args.attn
    if attn == "auto":
        probe = probe_attention(hf, inputs, labels[0], args.probe)
        attn = min(ATTENTION, key=lambda a: min(probe[a]))
        print(f"transformers forward+backward (min of {args.probe}): " + ", ".join(
            f"{a} {min(t):.0f} ms" for a, t in probe.items()) + f" -> {attn}")
    hf.set_attn_implementation(attn)
    adamw_probe: dict[str, list[float]] = {}
    adamw = args.adamw
    if adamw == "auto":
        adamw_probe = probe_adamw(hf, inputs, labels[0], args.probe)
        adamw = min(ADAMW, key=lambda a: min(adamw_probe[a]))
        print(f"torch.optim.AdamW step (min of {args.probe}): " + ", ".join(
            f"{a} {min(t):.0f} ms" for a, t in adamw_probe.items()) + f" -> {adamw}")
    opt = make_optimizer(hf, adamw)

    # untimed steps (step 0: compilation on the csm-jax side, the loss check)
    first: dict[str, float] = {}
    hist: dict[str, list[dict[str, float]]] = {"hf": [], "jax": []}
    for i in range(args.warmup):
        t0 = time.perf_counter()
        hist["hf"].append(hf_step(hf, opt, hf_params, inputs, labels[i], lrs[i]))
        t1 = time.perf_counter()
        state, m = jax_step(program, state, batch)
        t2 = time.perf_counter()
        hist["jax"].append(m)
        if i == 0:
            first = {"hf_first_step_ms": 1000 * (t1 - t0), "jax_first_step_ms": 1000 * (t2 - t1)}
    assert hist["jax"][0]["depth_frames"] == len(frames[0]) and hist["jax"][0]["c0_frames"] == target_frames
    assert abs(hist["jax"][0]["lr"] - lrs[0]) <= 1e-6 * lrs[0]
    check_first = compare(hist["hf"][0], hist["jax"][0])
    print(f"first step (incl. csm-jax compilation): transformers {first['hf_first_step_ms']:.0f} ms, csm-jax "
          f"{first['jax_first_step_ms']:.0f} ms")
    print_compare("step 0 (same weights, batch and depth frames)", check_first)

    times: dict[str, list[float]] = {"hf": [], "jax": []}
    other = OtherLoad()
    for i in range(args.warmup, total):
        for side in (("hf", "jax") if i % 2 == 0 else ("jax", "hf")):
            t0 = time.perf_counter()
            if side == "hf":
                m = hf_step(hf, opt, hf_params, inputs, labels[i], lrs[i])
            else:
                state, m = jax_step(program, state, batch)
            times[side].append(1000 * (time.perf_counter() - t0))
            hist[side].append(m)
    other_cores = other.cores()
    check_last = compare(hist["hf"][-1], hist["jax"][-1])
    print_compare(f"step {total - 1} (after {total - 1} AdamW updates on each side)", check_last)

    r = {side: stats(t) for side, t in times.items()}
    for side in r:
        sec = r[side]["median_ms"] / 1000
        r[side] |= {"frames_per_s": target_frames / sec, "rows_per_s": batch_size * seq / sec}
    ratio = r["hf"]["median_ms"] / r["jax"]["median_ms"]
    print(f"\n{'':<36} | {'min ms':>8} | {'median ms':>9} | {'frames/s':>9} | {'rows/s':>8}")
    for side, label in (("hf", f"transformers ({attn}, AdamW {adamw})"), ("jax", "csm-jax (jit)")):
        print(f"{label:<36} | {r[side]['min_ms']:8.0f} | {r[side]['median_ms']:9.0f} | "
              f"{r[side]['frames_per_s']:9.0f} | {r[side]['rows_per_s']:8.0f}")
    print(f"ratio (transformers median / csm-jax median): {ratio:.2f}x  ({args.steps} timed steps per side, "
          f"alternating; frames/s = {target_frames} target frames per step / median step time)")
    print(f"total {time.perf_counter() - t_start:.0f} s | peak RSS {peak_rss_gb():.1f} GB | other processes used "
          f"{other_cores:.2f} cores during the timed steps" + (
              "  <- the machine was not idle: re-run" if other_cores > 0.1 else ""))

    if args.json:
        args.json.write_text(json.dumps({
            "env": {**environment(load), "peak_rss_gb": peak_rss_gb(), "other_process_cores_during_timed": other_cores},
            "args": {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()},
            "config": {"size": args.size, "params": n_params, "backbone": vars(bb) | {"rope_scaling": None},
                       "decoder": vars(dd) | {"rope_scaling": None}, "num_codebooks": k,
                       "audio_vocab": jcfg.audio_vocab_size, "text_vocab": jcfg.text_vocab_size},
            "batch": {"batch": batch_size, "seq": seq, "target_frames": target_frames,
                      "depth_frames": len(frames[0]), "depth_fraction": args.depth_fraction},
            "hf_attention": attn, "hf_attention_probe_ms": probe, "hf_adamw": adamw, "hf_adamw_probe_ms": adamw_probe,
            "first_step": first, "results": r, "ratio": ratio,
            "loss_check": {"first": check_first, "last": check_last},
            "history": hist,
        }, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
