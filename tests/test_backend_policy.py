"""The backend policy (`csm_jax.backend`, issue 10): per-backend defaults, config overrides, and what the model
compiles under each choice."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.backend import BackendPolicy, PolicyOverrides
from csm_jax.csm.config import CsmConfig, LlamaConfig
from csm_jax.csm.engine import Engine
from csm_jax.csm.llama import linear
from csm_jax.csm.model import Csm
from csm_jax.serving.config import ServeConfig


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    backend.configure(None)


def test_defaults_differ_by_backend() -> None:
    cpu = backend.policy_for("cpu")
    assert cpu.small_row_products and cpu.quantized_compute_dtype == cpu.serving_dtype == "float32"
    for name in ("gpu", "cuda", "rocm", "tpu"):
        accel = backend.policy_for(name)
        assert not accel.small_row_products and accel.quantized_compute_dtype == accel.serving_dtype == "bfloat16"
        assert accel.small_rows == cpu.small_rows
    assert backend.current() == backend.policy_for(jax.default_backend())


def test_overrides() -> None:
    assert backend.resolve({"small_row_products": False}, "cpu") == backend.policy_for("cpu").replace(
        small_row_products=False)
    assert backend.resolve({"small_row_products": None}, "cpu") == backend.policy_for("cpu")  # None: the default
    assert backend.resolve({"small_row_products": True, "small_rows": 8}, "gpu").small_rows == 8
    assert backend.resolve(PolicyOverrides(quantized_compute_dtype="bfloat16"), "cpu").quantized_compute_dtype == \
        "bfloat16"
    with pytest.raises(ValueError, match="unknown backend policy key"):
        backend.resolve({"attention": "flash"}, "cpu")
    with pytest.raises(TypeError):
        backend.resolve({"small_row_products": "yes"}, "cpu")
    with pytest.raises(ValueError):
        backend.resolve({"small_rows": 1}, "cpu")

    default = backend.current()
    flipped = backend.configure({"small_row_products": not default.small_row_products})
    assert backend.current() == flipped and flipped.small_row_products != default.small_row_products
    with backend.use(small_rows=4) as scoped:
        assert backend.current() == scoped == flipped.replace(small_rows=4)
    assert backend.current() == flipped
    with pytest.raises(ValueError):  # a bad override leaves the policy as it was
        backend.configure({"nope": 1})
    assert backend.current() == flipped
    assert backend.configure(None) == default == backend.current()


def test_serve_config_overrides() -> None:
    cfg = ServeConfig.from_dict({"engine": {"backend": {"small_row_products": False, "small_rows": None}},
                                 "model": {"quantize": "int8"}})
    assert cfg.engine.backend == PolicyOverrides(small_row_products=False)
    assert cfg.model.quantize == "int8"
    assert backend.resolve(cfg.engine.backend, "cpu").small_row_products is False
    assert ServeConfig().engine.backend.as_dict() == {}  # nothing overridden by default
    with pytest.raises(ValueError, match="unknown config key"):
        ServeConfig.from_dict({"engine": {"backend": {"scan_layers": True}}})


def test_the_server_serves_in_the_policys_dtype() -> None:
    """`model.dtype: null` serves in the policy's `serving_dtype` (float32 on this CPU, bfloat16 where the policy
    says so, as on accelerators); `model.dtype` overrides it, and quantised weights compute in the policy's
    `quantized_compute_dtype`."""
    from csm_jax.serving.config import ModelConfig
    from csm_jax.serving.server import build_generator

    def served(model: dict, policy: dict) -> tuple[str, set]:
        config = ServeConfig(model=ModelConfig(random_seed=0, **model))
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine,
                                                                        backend=PolicyOverrides(**policy)))
        generator, _ = build_generator(config)
        return generator.cfg.dtype, {str(x.dtype) for x in jax.tree_util.tree_leaves(generator.params)}

    assert served({}, {}) == ("float32", {"float32"})
    assert served({}, {"serving_dtype": "bfloat16"}) == ("bfloat16", {"bfloat16"})
    assert served({"dtype": "float32"}, {"serving_dtype": "bfloat16"}) == ("float32", {"float32"})
    dtype, stored = served({"quantize": "int8"}, {"serving_dtype": "bfloat16"})
    assert dtype == "float32" and stored == {"float32", "int8"}  # quantized_compute_dtype: float32 on CPU
    dtype, stored = served({"quantize": "bf16"}, {})
    assert dtype == "float32" and stored == {"float32", str(jnp.dtype(jnp.bfloat16))}


def _ops(text: str) -> tuple[int, int]:
    return text.count("dot_general"), text.count("stablehlo.reduce")


def test_small_row_products_in_hlo() -> None:
    """A 4-row decode product is a dot with small_row_products off and a multiply-reduce with it on; full
    forward passes (decode=False) are dots either way."""
    x, w = jnp.ones((4, 64)), jnp.ones((48, 64))
    texts = {}
    for flag in (False, True):
        with backend.use(BackendPolicy(small_row_products=flag)):
            texts[flag] = jax.jit(lambda x, w: linear(x, w, decode=True)).lower(x, w).as_text()
            assert _ops(jax.jit(lambda x, w: linear(x, w)).lower(x, w).as_text()) == (1, 0)
    assert _ops(texts[False]) == (1, 0)
    assert _ops(texts[True]) == (0, 1)
    with backend.use(BackendPolicy(small_row_products=True, small_rows=2)):  # 4 rows > small_rows: a dot
        assert _ops(jax.jit(lambda x, w: linear(x, w, decode=True)).lower(x, w).as_text()) == (1, 0)


def small_config() -> CsmConfig:
    backbone = LlamaConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           intermediate_size=128, max_seq_len=48)
    decoder = LlamaConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                          intermediate_size=64, max_seq_len=4)
    return CsmConfig(backbone=backbone, decoder=decoder, text_vocab_size=100, audio_vocab_size=67, num_codebooks=4)


@pytest.fixture(scope="module")
def model() -> tuple[dict, CsmConfig, list[tuple[np.ndarray, np.ndarray]]]:
    cfg = small_config()
    k = cfg.num_codebooks
    params = nn.meta.unbox(backend.jit_init(Csm(cfg).init)(jax.random.key(0), jnp.zeros((1, 1, k + 1), jnp.int32),
                                                          jnp.ones((1, 1, k + 1), bool))["params"])
    rng = np.random.default_rng(0)
    prompts = []
    for n in (9, 14, 5, 11):
        tokens = rng.integers(0, 60, (n, k + 1)).astype(np.int32)
        prompts.append((tokens, np.ones((n, k + 1), bool)))
    return params, cfg, prompts


def test_engine_step_hlo_follows_policy(model) -> None:
    """The engine's 4-row frame step: every projection a dot without small-row products; with them, the
    decode projections become reductions (the attention products stay dots)."""
    params, cfg, _ = model
    counts = {}
    for flag in (False, True):
        eng = Engine(params, cfg, 4, policy=BackendPolicy(small_row_products=flag))
        counts[flag] = _ops(eng._step.lower(eng.params, eng.init_state()).as_text())
    (dots_off, reduces_off), (dots_on, reduces_on) = counts[False], counts[True]
    # per backbone / decoder layer: qkv, o, gate, up, down; plus the projection and the two heads
    projections = 5 * (cfg.backbone.num_layers + cfg.decoder.num_layers) + 3
    assert dots_off - dots_on >= projections
    assert reduces_on - reduces_off >= projections


def test_engine_codes_identical_under_both_policies(model) -> None:
    """fp32 on CPU: the same codes (sampled, seeded) and the same logits whichever form the products take."""
    params, cfg, prompts = model
    codes, logits = {}, {}
    for flag in (False, True):
        policy = BackendPolicy(small_row_products=flag)
        eng = Engine(params, cfg, 4, policy=policy)
        state = eng.prefill(eng.init_state(), [0, 1, 2, 3], prompts, [0, 1, 2, 3], [0.9] * 4, [50] * 4)
        with backend.use(policy):
            logits[flag] = np.asarray(jax.jit(lambda p, s: Csm(cfg).apply(
                {"params": p}, s.tokens[:, None], s.mask[:, None], s.positions[:, None], s.caches,
                method=Csm.backbone_step)[0])(eng.params, state))
        frames = []
        for _ in range(5):
            state, c = eng.step(state)
            frames.append(np.asarray(c))
        codes[flag] = np.stack(frames)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(codes[True], codes[False])


def test_filled_attention_equals_full_attention(model) -> None:
    """decode_attention="filled" (blocks up to the longest row, online softmax) gives the logits of one masked
    product over the whole cache, and the same sampled codes, with rows of different lengths crossing block
    boundaries; its HLO has the data-dependent loop and no conditional."""
    params, cfg, prompts = model
    codes, logits, hlo = {}, {}, {}
    for mode in ("full", "filled"):
        policy = backend.current().replace(decode_attention=mode, attention_block=8)  # 48 slots: 6 blocks
        eng = Engine(params, cfg, 4, policy=policy)
        state = eng.prefill(eng.init_state(), [0, 1, 2, 3], prompts, [5, 6, 7, 8], [0.9] * 4, [50] * 4)
        hlo[mode] = eng._step.lower(eng.params, state).compile().as_text()
        frames, steps = [], []
        logits_of = jax.jit(lambda p, s: Csm(cfg).apply(
            {"params": p}, s.tokens[:, None], s.mask[:, None], s.positions[:, None], s.caches,
            method=Csm.backbone_step)[0])  # traced once, under `policy`
        for _ in range(12):  # rows of 9..14 prompt rows run past slots 16 and 24
            with backend.use(policy):
                steps.append(np.asarray(logits_of(eng.params, state)))
            state, c = eng.step(state)
            frames.append(np.asarray(c))
        codes[mode], logits[mode] = np.stack(frames), np.stack(steps)
    np.testing.assert_allclose(logits["filled"], logits["full"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(codes["filled"], codes["full"])
    assert " while(" in hlo["filled"] and "conditional(" not in hlo["filled"]
    assert backend.policy_for("cpu").decode_attention == "filled"
    assert backend.policy_for("gpu").decode_attention == "full"
    with pytest.raises(ValueError, match="decode_attention"):
        backend.resolve({"decode_attention": "paged"}, "cpu")
