"""Carrying a CSM over to another codec's codes (`csm_jax.csm.recode`), on real espeak-ng speech coded twice: by a
random tiny Mimi and by the same Mimi with every codebook's entries reordered (entry 0 kept in place: id 0 is also
the end frame's). The second codec's codes are then a known permutation of the first's, so a recoded model must read
and score the new codes exactly as the original model reads and scores the old ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.codec.codec import MimiCodec
from csm_jax.csm.model import Csm
from csm_jax.csm.prompt import PromptFormat
from csm_jax.csm.recode import code_cooccurrence, recode_params
from csm_jax.csm.weights import save_converted
from csm_jax.data import Dataset, Loader, make_espeak_corpus, prepare
from csm_jax.default_model import byte_tokenizer, tiny_mimi_config
from csm_jax.experiment import recoded_init
from csm_jax.training.state import init_params
from csm_jax.training.synthetic import tiny_config

K, CODES, VOCAB = 8, 2048, 2051
CFG = tiny_config(num_codebooks=K).replace(audio_vocab_size=VOCAB, text_vocab_size=258)


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The corpus prepared by a codec and by its reordered twin; perms[k][o] is the twin's index of code o."""
    root = tmp_path_factory.mktemp("recode")
    corpus = make_espeak_corpus(root / "corpus", num_conversations=4, turns=3, seed=0)
    old = MimiCodec.random(tiny_mimi_config(), seed=1)
    perms = np.stack([np.concatenate([[0], 1 + np.random.default_rng(k).permutation(CODES - 1)]) for k in range(K)])
    params = jax.tree.map(np.asarray, old.params)
    quantizer = params["quantizer"]
    for name, ks in (("semantic", [0]), ("acoustic", range(1, K))):
        books = quantizer[name]["codebooks"].copy()
        for i, k in enumerate(ks):
            books[i] = books[i][np.argsort(perms[k])]  # entry perms[k][o] of the twin is entry o of the codec
        quantizer[name]["codebooks"] = books
    new = MimiCodec(params, old.config)
    fmt = PromptFormat(byte_tokenizer(), K, VOCAB)
    for name, codec in (("old", old), ("new", new)):
        prepare(corpus, root / name, codec, fmt, K, progress=False)
    return {"old": Dataset.open(root / "old"), "new": Dataset.open(root / "new"), "perms": perms, "fmt": fmt,
            "root": root}


@pytest.fixture(scope="module")
def params() -> dict:
    return jax.device_get(backend.jit_init(init_params, static_argnums=0)(CFG, jax.random.key(0)))


def test_cooccurrence_counts_the_code_pairs_of_each_frame(codes: dict) -> None:
    """Every frame, each utterance's end frame (all codes 0) included, counts once at (perm[o], o)."""
    old, new, perms = codes["old"], codes["new"], codes["perms"]
    frames = [old.codes(i) for i in range(len(old))]
    assert not np.array_equal(np.concatenate(frames), np.concatenate([new.codes(i) for i in range(len(new))]))
    old_codes = np.concatenate([np.concatenate([f, np.zeros((1, K), f.dtype)]) for f in frames]).astype(np.int64)
    counts = code_cooccurrence(old, new, K)
    assert len(counts) == K
    for k, c in enumerate(counts):
        assert c.shape == (CODES, CODES) and c.sum() == len(old_codes) == sum(map(len, frames)) + len(frames)
        expected = np.bincount(old_codes[:, k], minlength=CODES)
        np.testing.assert_array_equal(c.toarray()[perms[k], np.arange(CODES)], expected)  # only (perm[o], o)
        assert c.nnz == np.count_nonzero(expected)


def test_a_recoded_model_reads_and_scores_the_new_codes_as_the_original_the_old(codes: dict, params: dict) -> None:
    """Hidden states of every row and the logits of every code that occurs are the same, for the backbone's
    codebook 0 and the depth decoder's codebooks 1..K-1; the unrecoded model reads the new codes differently."""
    old, new, perms, fmt = codes["old"], codes["new"], codes["perms"], codes["fmt"]
    recoded = recode_params(params, code_cooccurrence(old, new, K))
    model = Csm(CFG)
    used = [np.unique(np.concatenate([old.codes(i)[:, k] for i in range(len(old))] + [[0]])) for k in range(K)]
    old_loader, new_loader = (Loader(ds, fmt, batch_size=1, shuffle=False) for ds in (old, new))
    for example in (0, len(old_loader.examples) - 1):  # a first turn, and a turn after its context
        t_old, m_old, _ = old_loader.example_rows(example)
        t_new, m_new, _ = new_loader.example_rows(example)
        audio = m_old[:, :K]
        np.testing.assert_array_equal(t_new[:, :K][audio], perms[np.nonzero(audio)[1], t_old[:, :K][audio]])

        def forward(p: dict, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
            logits, hidden = model.apply({"params": p}, tokens[None], mask[None], method=Csm.backbone_forward)
            frame = int(np.nonzero(audio.all(axis=1))[0][-2])  # a spoken frame: depth logits of its codes
            depth = model.apply({"params": p}, hidden[:, frame - 1], tokens[None, frame, :K],
                                method=Csm.depth_forward)
            return np.asarray(logits[0]), np.asarray(hidden[0]), np.asarray(depth[0])

        logits, hidden, depth = forward(params, t_old, m_old)
        r_logits, r_hidden, r_depth = forward(recoded, t_new, m_new)
        np.testing.assert_allclose(r_hidden, hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r_logits[:, perms[0][used[0]]], logits[:, used[0]], rtol=1e-5, atol=1e-5)
        for k in range(1, K):
            np.testing.assert_allclose(r_depth[k - 1, perms[k][used[k]]], depth[k - 1, used[k]], rtol=1e-5,
                                       atol=1e-5)
        _, plain_hidden, _ = forward(params, t_new, m_new)
        assert np.abs(plain_hidden - hidden).max() > 1e-2


def test_unseen_codes_and_special_ids(codes: dict, params: dict) -> None:
    """A code that never occurs takes the frequency-weighted mean of the old rows; ids past the codebook keep theirs;
    the backbone and depth decoder are untouched."""
    counts = code_cooccurrence(codes["old"], codes["new"], K)
    recoded = recode_params(params, counts)
    head, new_head = np.asarray(params["codebook0_head"]), recoded["codebook0_head"]
    freq = np.asarray(counts[0].sum(axis=0)).ravel()
    unseen = np.nonzero(np.asarray(counts[0].sum(axis=1)).ravel() == 0)[0]
    assert len(unseen) > 0
    np.testing.assert_allclose(new_head[unseen], np.broadcast_to(freq @ head[:CODES] / freq.sum(),
                                                                 (len(unseen), head.shape[1])), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_head[CODES:], head[CODES:])
    embeddings = recoded["audio_embeddings"].reshape(K, VOCAB, -1)
    np.testing.assert_array_equal(embeddings[:, CODES:], np.asarray(params["audio_embeddings"]).reshape(K, VOCAB, -1)
                                  [:, CODES:])
    for name in ("backbone", "decoder", "projection", "text_embeddings"):
        for a, b in zip(jax.tree.leaves(recoded[name]), jax.tree.leaves(params[name])):
            np.testing.assert_array_equal(a, b)


def test_recoded_init_from_the_run_config(codes: dict, params: dict) -> None:
    """`model.recode_from` with `model.init`: the init weights recoded from the old dataset to `data.prepared`'s
    codes (here the training set is the whole new dataset)."""
    root = codes["root"]
    init = save_converted(root / "init", params, CFG)
    cfg = {"model": {"init": str(init), "recode_from": str(root / "old"), "config": CFG.to_dict()}}
    got = recoded_init(cfg, codes["new"])
    want = recode_params(params, code_cooccurrence(codes["old"], codes["new"], K))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs model.init"):
        recoded_init({"model": {**cfg["model"], "init": None}}, codes["new"])


def test_mismatched_datasets_and_models_are_clear_errors(codes: dict, params: dict, tmp_path: Path) -> None:
    old, new = codes["old"], codes["new"]
    with pytest.raises(ValueError, match="need 9"):
        code_cooccurrence(old, new, K + 1)
    partial = tmp_path / "partial"
    shutil.copytree(codes["root"] / "old", partial)
    index = (partial / "index.jsonl").read_text().splitlines()
    (partial / "index.jsonl").write_text("\n".join(index[1:]) + "\n")
    with pytest.raises(ValueError, match="not in the old one"):
        code_cooccurrence(Dataset.open(partial), new, K)
    with pytest.raises(ValueError, match="4 count matrices for a model of 8"):
        recode_params(params, code_cooccurrence(old, new, K)[:4])
