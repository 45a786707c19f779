"""Low-precision quality of a CSM: bf16 and int8 weights against float32, on the same weights and prompts.

    .venv/bin/python bench/precision_bench.py --model csm_jax/assets/voice \
        --data data/speech_large/prepared_p750               # a trained model on held-out real prompts (~2 min)
    .venv/bin/python bench/precision_bench.py --random csm_1b # full-size CSM-1B with seeded random weights (~19 GB)
    .venv/bin/python bench/precision_bench.py --random tiny   # smoke test of the script

Variants (`csm_jax.csm.quantize`): bf16 (weights stored and computed in bf16, the accelerator choice), bf16_f32
(weight-only bf16, float32 compute), int8 (weight-only, float32 compute, the CPU default) and int8_bf16 (int8 with
bf16 compute, the accelerator default). Reported against float32: teacher-forced codebook-0 logits (max and mean
absolute error, the logit spread, top-1 agreement; the issue asks >= 99 % for bf16, >= 97 % for int8); where top-1
flips happen (the largest float32 top-1 lead among the flipped rows, and top-1 agreement on the rows it leads by at
least NEAR_TIE); and greedy generation of `--frames` frames per prompt: the share of prompts whose whole greedy codes
equal float32's, among those whose first frame already agrees, and, where they part, float32's own top-1 lead at
the first decision that differs (its greedy path teacher-forced: codebook 0 from the backbone, the rest from the
depth decoder). Prompts: with `--data`, conversations of the held-out split of a prepared dataset, exactly as the
trainer's eval loader builds them (the model's prompt format); with `--random`, random audio and text rows. JSON
lines with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm_jax.csm import quantize
from csm_jax.csm.config import CsmConfig, LlamaConfig, csm_1b
from csm_jax.csm.engine import Engine
from csm_jax.csm.model import Csm
from csm_jax.csm.weights import load_csm_params

VARIANTS = ("bf16", "bf16_f32", "int8", "int8_bf16")
BOUNDS = {"bf16": 0.99, "bf16_f32": 0.99, "int8": 0.97, "int8_bf16": 0.97}
NEAR_TIE = 0.1  # logits: rows whose float32 top-1 leads by less are near-ties (probability ratio < 1.11)


def random_model(size: str) -> tuple[dict, CsmConfig]:
    if size == "csm_1b":
        cfg = csm_1b()
    else:
        cfg = CsmConfig(backbone=LlamaConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                                             intermediate_size=256, max_seq_len=256),
                        decoder=LlamaConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                                            intermediate_size=128, max_seq_len=8),
                        text_vocab_size=300, num_codebooks=8)
    k = cfg.num_codebooks
    init = jax.jit(lambda key: Csm(cfg).init(key, jnp.zeros((1, 1, k + 1), jnp.int32),
                                             jnp.ones((1, 1, k + 1), bool))["params"])
    return jax.tree_util.tree_map(np.asarray, nn.meta.unbox(init(jax.random.key(0)))), cfg


def random_prompts(cfg: CsmConfig, count: int, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    k, out = cfg.num_codebooks, []
    for _ in range(count):
        tokens = np.zeros((rows, k + 1), np.int32)
        mask = np.zeros((rows, k + 1), bool)
        text = rows // 3  # text rows, then audio rows, then the target's text rows
        tokens[:text, k] = rng.integers(0, cfg.text_vocab_size, text)
        mask[:text, k] = True
        tokens[text:-8, :k] = rng.integers(0, 2048, (rows - text - 8, k))
        mask[text:-8, :k] = True
        tokens[-8:, k] = rng.integers(0, cfg.text_vocab_size, 8)
        mask[-8:, k] = True
        out.append((tokens, mask))
    return out


def data_prompts(model_dir: str, prepared: str, count: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Held-out examples as the trainer builds them: (tokens, mask, rows before the target turn's audio)."""
    from csm_jax.csm.generator import load_csm
    from csm_jax.data.loader import Dataset, Loader, split

    fmt = load_csm(model_dir).prompt_format()
    _, held_out = split(Dataset.open(prepared), eval_conversations=100, seed=0)
    loader = Loader(held_out, fmt, batch_size=1, max_rows=384, shuffle=False)
    out = []
    for i in range(min(count, len(loader.examples))):
        tokens, mask, targets = loader.example_rows(i)
        first = int(np.argmax(targets))
        out.append((tokens, mask, first))
    return out


def variant(params: dict, cfg: CsmConfig, name: str) -> tuple[dict, CsmConfig]:
    if name == "bf16":
        return quantize.cast_params(params, "bfloat16"), cfg.replace(dtype="bfloat16")
    mode, compute = {"bf16_f32": ("bf16", "float32"), "int8": ("int8", "float32"),
                     "int8_bf16": ("int8", "bfloat16")}[name]
    return quantize.quantize_params(params, cfg, mode, compute)


def teacher_forced(params: dict, cfg: CsmConfig, prompts: list) -> np.ndarray:
    """Codebook-0 logits float32 [rows, V] of every prompt row, prompts run one by one."""
    fn = jax.jit(lambda p, t, m: Csm(cfg).apply({"params": p}, t, m, method=Csm.backbone_forward)[0])
    return np.concatenate([np.asarray(fn(params, t[None], m[None]))[0] for t, m, *_ in prompts])


def greedy(params: dict, cfg: CsmConfig, prompts: list, frames: int) -> np.ndarray:
    """Greedy codes int32 [P, frames, K] of each prompt's prefix (up to its target audio), batched."""
    eng = Engine(params, cfg, len(prompts))
    heads = [(t[:rest[0]], m[:rest[0]]) if rest else (t, m) for t, m, *rest in prompts]
    state = eng.prefill(eng.init_state(), list(range(len(heads))), heads, list(range(len(heads))),
                        [1.0] * len(heads), [1] * len(heads))
    out = []
    for _ in range(frames):
        state, codes = eng.step(state)
        out.append(np.asarray(codes))
    return np.stack(out, axis=1)


def path_margins(params: dict, cfg: CsmConfig, prompts: list, codes: np.ndarray) -> np.ndarray:
    """float32 [P, frames, K]: at each decision of the greedy `codes` [P, frames, K], the top-1 lead of the logits
    that chose it, teacher-forced along the path (a frame fed back reads its first `backbone_codebooks`, as the
    engine feeds it)."""
    k = cfg.num_codebooks
    model = Csm(cfg)
    forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Csm.backbone_forward))
    depth = jax.jit(lambda p, h, c: model.apply({"params": p}, h, c, method=Csm.depth_forward))
    out = []
    for (t, m, *rest), path in zip(prompts, codes):
        head, n = (rest[0] if rest else len(t)), len(path)
        frames = np.zeros((n, k + 1), np.int32)
        frames[:, :k] = path
        fed = np.broadcast_to(np.arange(k + 1) < cfg.backbone_codebooks, frames.shape)
        tokens, mask = np.concatenate([t[:head], frames[:-1]]), np.concatenate([m[:head], fed[:-1]])
        logits, hidden = forward(params, tokens[None], mask[None])
        chosen = slice(head - 1, head - 1 + n)  # the row whose logits chose each frame's codebook 0
        every = np.concatenate([np.asarray(logits[0, chosen])[:, None],
                                np.asarray(depth(params, hidden[0, chosen], path))], axis=1)  # [frames, K, V]
        ranked = np.sort(every, -1)
        out.append(ranked[..., -1] - ranked[..., -2])
    return np.stack(out)


def first_difference(codes: np.ndarray, ref: np.ndarray) -> list[tuple[int, int] | None]:
    """Per prompt, the first (frame, codebook) where `codes` [P, frames, K] differ from `ref`, or None."""
    out = []
    for got, want in zip(codes, ref):
        differ = np.argwhere(got != want)
        out.append(None if len(differ) == 0 else (int(differ[0][0]), int(differ[0][1])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a transformers CSM dir (e.g. a train/export.py export)")
    src.add_argument("--random", choices=("csm_1b", "tiny"), help="seeded random weights of this size")
    p.add_argument("--data", help="a prepared dataset (train/prepare.py) for --model's held-out prompts")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--rows", type=int, default=128, help="rows of each random prompt")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", help="write the results as JSON lines to this file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.model:
        params, cfg = load_csm_params(args.model)
        prompts = data_prompts(args.model, args.data, args.prompts) if args.data else \
            random_prompts(cfg, args.prompts, args.rows)
        source = f"{args.model} on {'held-out ' + args.data if args.data else 'random prompts'}"
    else:
        params, cfg = random_model(args.random)
        prompts = random_prompts(cfg, args.prompts, args.rows)
        source = f"random {args.random}"
    ref = teacher_forced(params, cfg, prompts)
    ranked = np.sort(ref, -1)
    margin = ranked[:, -1] - ranked[:, -2]  # float32's top-1 lead over its runner-up, per row
    ref_codes = greedy(params, cfg, prompts, args.frames)
    leads = path_margins(params, cfg, prompts, ref_codes)
    print(f"{source}: {len(prompts)} prompts, {ref.shape[0]} rows, vocab {ref.shape[1]}, logit std {ref.std():.3g}; "
          f"float32 runs in {time.perf_counter() - t0:.0f} s")
    records, ok = [], True
    for name in args.variants:
        p_, c_ = variant(params, cfg, name)
        got = teacher_forced(p_, c_, prompts)
        err = np.abs(got - ref)
        agree = got.argmax(-1) == ref.argmax(-1)
        top1 = float(np.mean(agree))
        clear = margin >= NEAR_TIE
        codes = greedy(p_, c_, prompts, args.frames)
        first = np.all(codes[:, 0] == ref_codes[:, 0], axis=-1)
        whole = np.all(codes == ref_codes, axis=(1, 2))
        rec = {"source": source, "variant": name, "rows": int(ref.shape[0]), "max_abs_err": float(err.max()),
               "mean_abs_err": float(err.mean()), "logit_std": float(ref.std()), "top1": top1,
               "top1_bound": BOUNDS[name], "greedy_first_frame_agree": int(first.sum()),
               "greedy_identical_given_first": int((whole & first).sum()), "frames": args.frames,
               "top1_clear": float(np.mean(agree[clear])) if clear.any() else None, "clear_rows": int(clear.sum()),
               "max_margin_flipped": float(margin[~agree].max()) if (~agree).any() else None,
               "greedy_near_tie_decisions": float(np.mean(leads < NEAR_TIE))}
        parted = [(i, at) for i, at in enumerate(first_difference(codes, ref_codes)) if at is not None and first[i]]
        lead_at = [float(leads[i][at]) for i, at in parted]
        rec["greedy_parting"] = [{"prompt": i, "frame": at[0], "codebook": at[1], "float32_lead": lead}
                                 for (i, at), lead in zip(parted, lead_at)]
        records.append(rec)
        ok &= top1 >= BOUNDS[name]
        print(f"{name:10} max |err| {rec['max_abs_err']:.4g}  mean |err| {rec['mean_abs_err']:.4g}  top-1 {top1:.4f} "
              f"({'PASS' if top1 >= BOUNDS[name] else 'MISS'} >= {BOUNDS[name]})  greedy {args.frames} frames "
              f"identical in {rec['greedy_identical_given_first']} of {rec['greedy_first_frame_agree']} prompts "
              "whose first frame agrees", flush=True)
        if rec["max_margin_flipped"] is not None:
            print(f"{'':10} where top-1 differs, float32's top-1 led by at most {rec['max_margin_flipped']:.3g}; "
                  f"top-1 {rec['top1_clear']:.4f} on the {rec['clear_rows']} rows where it leads by >= {NEAR_TIE}",
                  flush=True)
        if lead_at:
            at = ", ".join(f"{p['frame']}/{p['codebook']}" for p in rec["greedy_parting"])
            print(f"{'':10} greedy parts from float32 at frame/codebook {at}, where float32 led by at most "
                  f"{max(lead_at):.3g} (median {np.median(lead_at):.3g}); {rec['greedy_near_tie_decisions']:.1%} "
                  f"of float32's greedy decisions lead by < {NEAR_TIE}", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
