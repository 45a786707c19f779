"""Sharded generation (8 CPU devices: requests over `data`, heads/MLP over `tensor`; float32 and int8 weights) equals
unsharded, and batched generation equals the same requests run one by one."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from csm_fixtures import get_reference

import csm_jax
from csm_jax.sharding import make_mesh


def _prompts(k: int, text_vocab: int, audio_vocab: int, lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded batch of prompts: text rows then 3 audio rows each; trailing rows are padding (mask all False)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), max(lengths), k + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for b, n in enumerate(lengths):
        tokens[b, : n - 3, k] = rng.integers(0, text_vocab, n - 3)
        mask[b, : n - 3, k] = True
        tokens[b, n - 3 : n, :k] = rng.integers(1, audio_vocab - 3, (3, k))
        mask[b, n - 3 : n, :k] = True
    return tokens, mask


@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_sharded_equals_unsharded_and_batched_equals_single(shape, tmp_path_factory):
    assert jax.device_count() == 8
    ref = get_reference(shape, tmp_path_factory)
    with warnings.catch_warnings():  # the `wide` fixture bundles a 4-codebook codec; audio is not used here
        warnings.filterwarnings("ignore", message=".*bundled codec has 4 codebooks")
        gen = csm_jax.load_csm(ref.hf_dir)
        sharded = csm_jax.load_csm(ref.hf_dir, mesh=make_mesh(data=4, tensor=2))
    cfg = gen.cfg
    tokens, mask = _prompts(cfg.num_codebooks, cfg.text_vocab_size, cfg.audio_vocab_size, [6, 9, 7, 12], seed=5)

    for sampling in (dict(top_k=1), dict(temperature=0.9, top_k=5, seed=7)):
        plain = gen.generate_codes(tokens, mask, 10, **sampling)
        split = sharded.generate_codes(tokens, mask, 10, **sampling)
        assert [c.shape for c in plain] == [c.shape for c in split]
        assert all(len(c) >= 1 for c in plain)
        for a, b in zip(plain, split):
            np.testing.assert_array_equal(a, b)

    engine = sharded.engine(4)
    kernel = engine.params["backbone"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", None)  # [mlp, embed]
    qkv = engine.params["backbone"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]  # [kv_heads, qkv, hd, embed]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("tensor", None, None, None)
    assert engine.init_state().caches[0]["k"].sharding.spec[0] == "data"

    batched = gen.generate_codes(tokens, mask, 10, temperature=0.9, top_k=5, seed=7)
    for i in range(len(tokens)):
        single = gen.generate_codes(tokens[i], mask[i], 10, temperature=0.9, top_k=5, seed=7 + i)
        np.testing.assert_array_equal(batched[i], single)


def test_int8_sharded_equals_unsharded(tmp_path_factory):
    """int8 weights shard as the float ones do: each scale laid out as its kernel's output channels, codebook 0's
    head (kept float32) as the float head; sharded generation equals unsharded."""
    ref = get_reference("tiny", tmp_path_factory)
    gen = csm_jax.load_csm(ref.hf_dir, quantize="int8", dtype="float32")
    sharded = csm_jax.load_csm(ref.hf_dir, quantize="int8", dtype="float32", mesh=make_mesh(data=4, tensor=2))
    cfg = gen.cfg
    tokens, mask = _prompts(cfg.num_codebooks, cfg.text_vocab_size, cfg.audio_vocab_size, [6, 9, 7, 12], seed=3)
    for sampling in (dict(top_k=1), dict(temperature=0.9, top_k=5, seed=7)):
        for a, b in zip(gen.generate_codes(tokens, mask, 10, **sampling),
                        sharded.generate_codes(tokens, mask, 10, **sampling)):
            np.testing.assert_array_equal(a, b)
    params = sharded.engine(4).params
    gate = params["backbone"]["layers_0"]["mlp"]["gate_proj"]
    spec = jax.sharding.PartitionSpec
    assert gate["kernel"].dtype == np.int8 and gate["kernel"].sharding.spec == spec("tensor", None)  # [mlp, embed]
    assert gate["kernel_scale"].sharding.spec == spec("tensor")  # [mlp]
    assert params["codebook0_head"].dtype == np.float32 and "codebook0_head_scale" not in params
