"""CSM prompt rows: text turns and audio frames as rows of K+1 columns (K audio codebooks, then text).

A text turn is `<|begin_of_text|>[speaker]text<|end_of_text|>`, one token per row in column K; an audio turn is
one row per Mimi frame in columns 0..K-1 followed by an all-zero end frame. Masks mark the filled columns.
Used by the generator, the conversation manager and the training data loader alike.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
Rows = tuple[np.ndarray, np.ndarray]  # tokens int32 [S, K+1], mask bool [S, K+1]


def text_rows(tokenizer: Tokenizer, text: str, speaker: int, num_codebooks: int) -> Rows:
    """`[speaker]text` with BOS/EOS -> tokens int32 [S, K+1] (text in column K), mask bool [S, K+1]."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    if isinstance(speaker, bool) or not isinstance(speaker, int | np.integer) or speaker < 0:
        raise TypeError(f"speaker must be a non-negative int, got {speaker!r}")
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError(f"tokenizer lacks {BOS} / {EOS}")
    ids = [bos, *tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids, eos]
    k = num_codebooks
    tokens = np.zeros((len(ids), k + 1), np.int32)
    mask = np.zeros((len(ids), k + 1), bool)
    tokens[:, k], mask[:, k] = ids, True
    return tokens, mask


def code_rows(codes: np.ndarray, num_codebooks: int, audio_vocab_size: int) -> Rows:
    """Audio codes int [T, K'] (K' <= K codebooks) plus one all-zero end frame -> tokens int32 [T+1, K+1],
    mask bool [T+1, K+1]; codebooks past K' are masked out."""
    codes = np.asarray(codes)
    k = num_codebooks
    if codes.ndim != 2 or not 1 <= codes.shape[1] <= k or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be int [T, K'] with K' <= {k}, got {codes.dtype} {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= audio_vocab_size):
        raise ValueError(f"audio codes must be in [0, {audio_vocab_size})")
    t, kk = codes.shape
    tokens = np.zeros((t + 1, k + 1), np.int32)
    mask = np.zeros((t + 1, k + 1), bool)
    tokens[:t, :kk], mask[:, :kk] = codes, True
    return tokens, mask
