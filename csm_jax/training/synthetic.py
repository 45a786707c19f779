"""Synthetic training data and a tiny model config: for tests, smoke runs and examples (no dataset needed).

`synthetic_batch` lays out sequences as the data loader does: a text turn (column K), a context audio turn, then
the target audio turn with its all-zero end frame (`targets` True on those rows), then padding (fully masked).
`ListLoader` is the minimal loader protocol: iteration over a fixed list of batches (cycled) with
`state()` / `restore(state)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from csm_jax.csm.config import CsmConfig, LlamaConfig


def tiny_config(num_codebooks: int = 4, dtype: str = "float32") -> CsmConfig:
    """A very small CSM (2-layer backbone 32 wide, 1-layer depth decoder 16 wide, 24-entry audio vocab)."""
    backbone = LlamaConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           intermediate_size=64, max_seq_len=256)
    decoder = LlamaConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          intermediate_size=32, max_seq_len=num_codebooks)
    return CsmConfig(backbone=backbone, decoder=decoder, text_vocab_size=40, audio_vocab_size=24,
                     num_codebooks=num_codebooks, dtype=dtype)


def synthetic_batch(
    cfg: CsmConfig,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator | int = 0,
    min_len: int | None = None,
    codebooks: int | None = None,
    pattern: np.ndarray | None = None,
    lengths: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """A padded batch: per sequence `n` rows (min_len..seq_len): text rows, context audio, target audio + end frame.
    `codebooks`: audio columns filled (fewer than K masks the rest); `pattern` int [P, K]: audio frames are cycled
    from it (a learnable, repetitive stream) instead of random codes; `lengths`: the sequence lengths (>= 6)."""
    rng = np.random.default_rng(rng)
    k, v = cfg.num_codebooks, cfg.audio_vocab_size
    kk = k if codebooks is None else codebooks
    tokens = np.zeros((batch_size, seq_len, k + 1), np.int32)
    mask = np.zeros((batch_size, seq_len, k + 1), bool)
    targets = np.zeros((batch_size, seq_len), bool)
    out_lengths = np.zeros(batch_size, np.int32)
    lo = max(6, min_len or seq_len // 2)
    for b in range(batch_size):
        n = int(rng.integers(lo, seq_len + 1)) if lengths is None else int(lengths[b])
        n_text = int(rng.integers(1, max(2, n // 4)))
        n_audio = n - n_text - 1  # audio frames, the end frame excluded
        n_ctx = int(rng.integers(0, n_audio // 2 + 1))
        tokens[b, :n_text, k] = rng.integers(0, cfg.text_vocab_size, n_text)
        mask[b, :n_text, k] = True
        if pattern is not None:
            start = int(rng.integers(0, len(pattern)))
            frames = pattern[(start + np.arange(n_audio)) % len(pattern)]
        else:
            frames = rng.integers(1, v, (n_audio, k))
        audio = slice(n_text, n_text + n_audio)
        tokens[b, audio, :kk] = frames[:, :kk]
        mask[b, n_text : n, :kk] = True  # audio rows and the all-zero end frame
        if n_ctx:  # a context turn ends in its own end frame; make row n_text + n_ctx - 1 that frame
            tokens[b, n_text + n_ctx - 1, :k] = 0
        targets[b, n_text + n_ctx : n] = True
        # filler in masked columns must not matter
        tokens[b, n:, :] = rng.integers(0, v, (seq_len - n, k + 1))
        tokens[b, :n_text, :k] = rng.integers(0, v, (n_text, k))
        out_lengths[b] = n
    return {"tokens": tokens, "mask": mask, "targets": targets, "lengths": out_lengths}


class ListLoader:
    """Cycles over a fixed list of batches; `state()` / `restore()` give exact resumption."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        if not batches:
            raise ValueError("no batches")
        self.batches = batches
        self.position = 0

    def __iter__(self) -> "ListLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
