"""Carry a trained CSM over to another codec's codes: its audio vocabulary re-initialised from code co-occurrence.

    counts = code_cooccurrence(old_dataset, new_dataset, num_codebooks=8)   # same utterances, two codecs
    params = recode_params(params, counts)                                   # then fine-tune on the new codes

A codec whose encoder or quantizer trained further codes the same audio differently (the voice codec's pitch-trained
encoder kept 8.6 % of codebook 0's indices), so a CSM trained on the old codes reads and predicts indices that no
longer mean what it learned. Instead of re-learning its audio embeddings and output rows from whatever sat at the
same index, each new code n of codebook k takes the old codes' rows weighted by how often they coded the same
frame:

    row_new[k, n] = sum_o P_k(o | n) row_old[k, o],     P_k(o | n) = C_k[n, o] / sum_o' C_k[n, o']

where C_k counts the frames of the same utterances that the new codec codes n and the old codec o. This is applied
to the audio embeddings (`audio_embeddings`, read by the backbone and the depth decoder) and to the output rows
(`codebook0_head`, `audio_head`), so a new code's logit starts as the P(o | n)-weighted mean of the old codes'
logits. A new code that never occurs takes the frequency-weighted mean of the old rows; the ids above the codebook
size (special frames) keep theirs. The backbone and the depth decoder are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse

from csm_jax.data.loader import Dataset

_AUDIO_ROWS = ("audio_embeddings", "codebook0_head", "audio_head")


def code_cooccurrence(old: Dataset, new: Dataset, num_codebooks: int) -> list[scipy.sparse.csr_matrix]:
    """Two prepared datasets of the same utterances (matched by audio path; every utterance of `new` must be in
    `old` with as many frames) -> per codebook k < num_codebooks a float64 count matrix [V_new, V_old] (V: each
    dataset's codebook size): entry (n, o) counts the frames coded n by `new`'s codec and o by `old`'s. Each
    utterance's end frame (all codes 0, as the CSM reads and predicts it after the turn) counts as a (0, 0) frame,
    so that id 0 keeps most of what it meant as the end of a turn."""
    for name, ds in (("old", old), ("new", new)):
        if int(ds.meta["num_codebooks"]) < num_codebooks:
            raise ValueError(f"the {name} dataset has {ds.meta['num_codebooks']} codebooks, need {num_codebooks}")
    v_new, v_old = int(new.meta["codebook_size"]), int(old.meta["codebook_size"])
    by_audio = {e.audio: i for i, e in enumerate(old.entries)}
    new_codes, old_codes = [], []
    for i, e in enumerate(new.entries):
        j = by_audio.get(e.audio)
        if j is None:
            raise ValueError(f"{e.audio} is in the new codes' dataset but not in the old one")
        a, b = new.codes(i)[:, :num_codebooks], old.codes(j)[:, :num_codebooks]
        if a.shape != b.shape:
            raise ValueError(f"{e.audio}: {a.shape[0]} frames in the new dataset, {b.shape[0]} in the old one")
        end = np.zeros((1, num_codebooks), a.dtype)
        new_codes += [a, end]
        old_codes += [b, end]
    if not new_codes:
        raise ValueError("the new codes' dataset is empty")
    n, o = np.concatenate(new_codes).astype(np.int64), np.concatenate(old_codes).astype(np.int64)
    ones = np.ones(len(n))
    return [scipy.sparse.coo_matrix((ones, (n[:, k], o[:, k])), shape=(v_new, v_old)).tocsr()
            for k in range(num_codebooks)]


def _remap(rows: np.ndarray, counts: scipy.sparse.csr_matrix) -> np.ndarray:
    """rows float [A, D] of one codebook's ids (codes first, then special ids) -> the same with codes 0..V_new-1
    re-initialised from `counts` [V_new, V_old]."""
    v_new, v_old = counts.shape
    rows = np.asarray(rows, np.float64)
    per_new = np.asarray(counts.sum(axis=1)).ravel()
    per_old = np.asarray(counts.sum(axis=0)).ravel()
    mixed = counts @ rows[:v_old]
    fallback = per_old @ rows[:v_old] / per_old.sum()
    out = rows.copy()
    out[:v_new] = np.where(per_new[:, None] > 0, mixed / np.maximum(per_new, 1.0)[:, None], fallback)
    return out


def recode_params(params: Mapping[str, Any], counts: Sequence[scipy.sparse.spmatrix]) -> dict[str, Any]:
    """CSM parameters (float, not quantised) and one count matrix [V_new, V_old] per codebook (`code_cooccurrence`)
    -> the parameters with `audio_embeddings` [K * A, D], `codebook0_head` [A, D] and `audio_head` [K - 1, A, D]
    re-initialised for the new codes (module docstring; D is the backbone's or the decoder's width), float32;
    every other entry is passed through."""
    if any(name + "_scale" in params for name in ("codebook0_head", "audio_head")):
        raise ValueError("recode_params needs float parameters, not int8-quantised ones")
    heads = np.asarray(params["audio_head"])
    num_codebooks, vocab = heads.shape[0] + 1, heads.shape[1]
    if len(counts) != num_codebooks:
        raise ValueError(f"{len(counts)} count matrices for a model of {num_codebooks} codebooks")
    for k, c in enumerate(counts):
        if max(c.shape) > vocab:
            raise ValueError(f"codebook {k}: codes up to {max(c.shape)} do not fit the audio vocabulary ({vocab})")
    embeddings = np.asarray(params["audio_embeddings"]).reshape(num_codebooks, vocab, -1)
    recoded = {
        "audio_embeddings": np.concatenate([_remap(embeddings[k], c) for k, c in enumerate(counts)]),
        "codebook0_head": _remap(np.asarray(params["codebook0_head"]), counts[0]),
        "audio_head": np.stack([_remap(heads[k - 1], counts[k]) for k in range(1, num_codebooks)]),
    }
    return {**params, **{name: recoded[name].astype(np.float32) for name in _AUDIO_ROWS}}
