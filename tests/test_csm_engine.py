"""Engine-level behaviour the server relies on: rows advance independently, and a finished row can be refilled
with a new request mid-stream without disturbing the others."""

from __future__ import annotations

import numpy as np
import pytest
from csm_fixtures import get_reference

import csm_jax


def _prompt(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, k + 1), np.int32)
    mask = np.zeros((n, k + 1), bool)
    tokens[: n - 2, k], mask[: n - 2, k] = rng.integers(0, 40, n - 2), True  # ids valid in every tiny shape
    tokens[n - 2 :, :k], mask[n - 2 :, :k] = rng.integers(1, 12, (2, k)), True
    return tokens, mask


def _run(engine, state, frames: int) -> tuple[object, np.ndarray]:
    out = []
    for _ in range(frames):
        state, codes = engine.step(state)
        out.append(np.asarray(codes))
    return state, np.stack(out, axis=1)  # [B, frames, K]


def test_refilling_a_row_leaves_other_rows_untouched(tmp_path_factory):
    gen = csm_jax.load_csm(get_reference("tiny", tmp_path_factory).hf_dir)
    k = gen.cfg.num_codebooks
    a, b, c = _prompt(k, 7, 1), _prompt(k, 10, 2), _prompt(k, 5, 3)
    sampling = dict(temperature=[0.9, 0.9], top_k=[5, 5])
    engine = gen.engine(2)

    # Reference: each request alone in a fresh batch of one.
    solo = gen.engine(1)
    ref = {}
    for name, prompt, seed in (("a", a, 10), ("b", b, 11), ("c", c, 12)):
        state = solo.prefill(solo.init_state(), [0], [prompt], [seed], [0.9], [5])
        ref[name] = _run(solo, state, 8)[1][0]

    state = engine.prefill(engine.init_state(), [0, 1], [a, b], [10, 11], **sampling)
    state, first = _run(engine, state, 3)
    state = engine.prefill(state, [0], [c], [12], [0.9], [5])  # row 0 gets a new request; row 1 continues
    state, second = _run(engine, state, 8)

    np.testing.assert_array_equal(first[0], ref["a"][:3])
    np.testing.assert_array_equal(np.concatenate([first[1], second[1][:5]]), ref["b"])
    np.testing.assert_array_equal(second[0], ref["c"])


def test_idle_rows_emit_nothing_and_do_not_advance(tmp_path_factory):
    gen = csm_jax.load_csm(get_reference("tiny", tmp_path_factory).hf_dir)
    engine = gen.engine(2)
    state = engine.prefill(engine.init_state(), [1], [_prompt(gen.cfg.num_codebooks, 6, 4)], [0], [0.9], [5])
    before = np.asarray(state.positions)
    state, codes = _run(engine, state, 4)
    assert not codes[0].any()  # row 0 was never filled
    assert np.asarray(state.positions)[0] == before[0]
    assert codes[1].any()


def test_fewer_codebooks(tmp_path_factory):
    """num_codebooks=k' generates only codebooks 0..k'-1; the first frame matches the full model's prefix."""
    path = get_reference("rope", tmp_path_factory).hf_dir  # 8 codebooks
    with pytest.warns(UserWarning, match="bundled codec has 4 codebooks, CSM needs 8"):  # token-level use only
        full, fewer = csm_jax.load_csm(path), csm_jax.load_csm(path, num_codebooks=3)
    tokens, mask = _prompt(full.cfg.num_codebooks, 7, 5)
    a = full.generate_codes(tokens, mask, 4, top_k=1)
    b = fewer.generate_codes(tokens, mask, 4, top_k=1)
    assert a.shape[1] == 8 and b.shape[1] == 3 and len(b) >= 1
    np.testing.assert_array_equal(b[0], a[0, :3])


@pytest.mark.parametrize("vocab", [5, 2051])
def test_kth_largest_and_row_sampling(vocab):
    """The top_k threshold (a branch-free bitwise search) is each row's k-th largest value with ties, signed zeros
    and -inf counted, and `sample_rows` draws per row what `sample_top_k` draws alone."""
    import jax

    from csm_jax.csm.sampling import kth_largest, sample_rows, sample_top_k

    rng = np.random.default_rng(vocab)
    kth = jax.jit(kth_largest)
    for trial in range(6):
        x = rng.standard_normal((3, vocab)).astype(np.float32)
        if trial % 2:
            x = np.round(x, 1)  # many ties
        x[:, rng.integers(0, vocab, 2)] = -np.inf
        x[:, rng.integers(0, vocab, 2)] = rng.choice([0.0, -0.0, 3e38, -3e38, 1e-45], 2)
        high = vocab if trial >= 3 else min(vocab, 64)
        k = rng.integers(1, high + 1, 3).astype(np.int32)
        want = np.sort(x, axis=-1)[:, ::-1][np.arange(3), k - 1][:, None]
        np.testing.assert_array_equal(np.asarray(kth(x, k)), want)
        keys = jax.random.split(jax.random.key(trial), 3)
        temperature = rng.uniform(0.5, 1.5, 3).astype(np.float32)
        rows = np.asarray(jax.jit(sample_rows)(x, keys, temperature, k))
        for i in range(3):
            assert rows[i] == int(sample_top_k(x[i : i + 1], keys[i], temperature[i : i + 1], k[i : i + 1])[0])
            assert x[i, rows[i]] >= want[i, 0]
