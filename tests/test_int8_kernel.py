"""The native int8 decode kernel (`csm_jax.kernels.int8_gemv`) against a float64 reference, inside jit and vmap, as
`csm.llama.linear`'s int8 decode product under the backend policy, and its fallback when it cannot be built."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax import backend
from csm_jax.csm.llama import linear
from csm_jax.kernels import int8_gemv

TOL = 2e-3  # max |error| over the reference's std (int16 activations: ~5e-4 measured)


VNNI = "avx512_vnni" in Path("/proc/cpuinfo").read_text().split()  # this CPU has the fast path's instructions


def _default() -> str:
    """The default build: the AVX512-VNNI path where the CPU has it, else the portable one (checked, not assumed)."""
    target, fast = int8_gemv.load()
    assert fast == VNNI
    return target


@pytest.fixture(scope="module", autouse=True)
def _kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSM_JAX_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


def _case(rows: int, n_in: int, n_out: int = 19, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    x[:, rng.choice(n_in, max(1, n_in // 50), replace=False)] *= 8  # outlier channels
    q = rng.integers(-127, 128, (n_out, n_in), dtype=np.int8)
    scale = rng.uniform(0.5, 1.5, n_out).astype(np.float32) * 0.01
    return x, q, scale


def _rel_err(y: jax.Array, x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> float:
    ref = x.astype(np.float64) @ (q.astype(np.float64) * scale.astype(np.float64)[:, None]).T
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / ref.std())


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
@pytest.mark.parametrize("n_in", [64, 2048, 100, 1000])  # multiples of 64 and not
def test_matches_reference(portable: bool, rows: int, n_in: int) -> None:
    target = int8_gemv.load(portable=True)[0] if portable else _default()
    x, q, scale = _case(rows, n_in)
    y = jax.jit(lambda *a: int8_gemv.int8_matmul(*a, target=target))(x, q, scale)
    assert y.shape == (rows, q.shape[0]) and y.dtype == jnp.float32
    assert _rel_err(y, x, q, scale) < (1e-6 if portable else TOL)


@pytest.mark.parametrize("rows", [1, 5])
def test_output_chunks_shared_with_the_thread_pool(rows: int) -> None:
    # 4096 inputs: 64-channel chunks (256 KiB of weights); 333 channels: 6 chunks, the last one odd-sized
    x, q, scale = _case(rows, 4096, n_out=333, seed=rows)
    y = jax.jit(lambda *a: int8_gemv.int8_matmul(*a, target=_default()))(x, q, scale)
    assert _rel_err(y, x, q, scale) < TOL


def test_leading_dims_and_vmap() -> None:
    target = _default()
    x, q, scale = _case(6, 96)
    y = int8_gemv.int8_matmul(x.reshape(2, 3, 96), q, scale, target=target)
    assert y.shape == (2, 3, q.shape[0]) and _rel_err(y.reshape(6, -1), x, q, scale) < TOL
    qs = np.stack([q, q[::-1]])
    ys = jax.jit(jax.vmap(lambda a, b: int8_gemv.int8_matmul(a, b, scale, target=target)))(x.reshape(2, 3, 96), qs)
    assert _rel_err(ys[0], x[:3], q, scale) < TOL and _rel_err(ys[1], x[3:], qs[1], scale) < TOL


def _decode_linear():
    """linear's decode-step product of an int8 kernel, jitted (traced under the policy in force at the call)."""
    return jax.jit(lambda x, q, scale: linear(x, q, decode=True, scale=scale))


def test_linear_native_matches_xla() -> None:
    """Under int8_kernel="native" the product is the kernel's where the CPU has AVX512-VNNI, else XLA's."""
    _default()
    x, q, scale = _case(4, 256, n_out=2 * 3 * 8)
    x, qk, sk = x.reshape(4, 1, 256), q.reshape(2, 3, 8, 256), scale.reshape(2, 3, 8)
    ys = {}
    for kernel in ("native", "xla"):
        with backend.use(int8_kernel=kernel):
            f = _decode_linear()
            ys[kernel] = f(x, qk, sk)
            hlo = f.lower(x, qk, sk).as_text()
        assert (int8_gemv.TARGET in hlo) == (kernel == "native" and VNNI)
    assert ys["native"].shape == ys["xla"].shape == (4, 1, 2, 3, 8)
    assert _rel_err(ys["native"].reshape(4, -1), x.reshape(4, -1), q, scale) < TOL
    assert _rel_err(ys["xla"].reshape(4, -1), x.reshape(4, -1), q, scale) < 1e-5


def test_broken_compiler_falls_back(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(int8_gemv, "CXX", "false")
    monkeypatch.setattr(int8_gemv, "_registered", {})
    monkeypatch.setenv("CSM_JAX_KERNEL_CACHE", str(tmp_path))
    int8_gemv.available.cache_clear()
    try:
        assert int8_gemv.available() is False
        assert sum("int8 kernel unavailable" in r.getMessage() for r in caplog.records) == 1
        x, q, scale = _case(1, 128)
        with backend.use(int8_kernel="native"):
            f = _decode_linear()
            assert int8_gemv.TARGET not in f.lower(x, q, scale).as_text()
            assert _rel_err(f(x, q, scale), x, q, scale) < 1e-5
    finally:
        int8_gemv.available.cache_clear()


def test_policy_field() -> None:
    assert backend.policy_for("cpu").int8_kernel == "native"
    assert backend.policy_for("gpu").int8_kernel == "xla"
    assert backend.resolve({"int8_kernel": "xla"}, "cpu").int8_kernel == "xla"
    with pytest.raises(ValueError, match="int8_kernel"):
        backend.resolve({"int8_kernel": "fbgemm"}, "cpu")
