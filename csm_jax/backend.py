"""The backend policy: every choice of *how* the model computes that depends on the machine, in one place.

The model states the math once; where the fastest form differs by backend it asks `current()` (at trace time: the
policy is static, so a compiled function keeps the policy it was traced with). The policy comes from
`jax.default_backend()` (`policy_for`), with overrides from config (`engine.backend` in configs/serve.yaml,
`load_csm(..., backend=...)`): a None override keeps the backend's default.

    policy = backend.current()                    # this process's policy
    backend.configure({"small_row_products": False})   # process-wide overrides (None: the backend's default)
    with backend.use(small_row_products=True):    # scoped (this thread / context), e.g. in tests
        ...

Choices the policy makes today:
- `small_row_products`: decode-step products of 2..`small_rows` rows as one fused multiply-and-reduce instead of a
  dot (`csm.llama.linear`). On XLA:CPU that streams the weights once at 25-45 GB/s where a dot reaches 10-20 GB/s
  for 2-8 rows, and stays ~1.6x faster than the dot at 16-32 rows (one row: a dot is fastest); on GPU/TPU a matrix
  multiply is the right form at every row count.
- `serving_dtype`: the dtype the entry points (the server, `python -m csm_jax.csm generate`) load a model in when
  their config names none (`model.dtype` and `model.quantize` null): float32 on CPU, bfloat16 on accelerators
  (weights stored in it, products accumulating in float32; `csm.llama`). The library's `load_csm` keeps a
  checkpoint's own dtype unless told.
- `quantized_compute_dtype`: the dtype weight-only int8 and bf16 kernels are computed in (`csm.quantize`): float32
  on CPU (XLA:CPU has no fast bf16 products), bfloat16 on accelerators (float32 there keeps the products' inputs
  exact for the same weight bytes read).
- `decode_attention`: how a one-frame step attends over its static KV cache (`csm.llama.Attention`). "filled":
  blocks of `attention_block` slots, only as many as the longest row has filled (a loop with a data-dependent
  trip count and an online softmax), so a frame reads the cache it uses rather than all max_seq_len slots; the
  CPU default. "full": one masked product over the whole cache: no data-dependent loop, which XLA:GPU would
  drive from the host once per block; the accelerator default (a ragged/paged kernel is the next step there).
- `int8_kernel`: how decode-step products of up to `csm_jax.kernels.int8_gemv.MAX_ROWS` float32 rows with int8
  weights run (`csm.llama.linear`). "native": a compiled AVX512-VNNI kernel called through `jax.ffi`
  (`csm_jax.kernels.int8_gemv`, built on first use): 3-5x faster than XLA:CPU's product at 1 row, 1.2-2x at 4-8; the CPU
  default, falling back to "xla" (after one warning) where it cannot be built or the CPU lacks AVX512-VNNI.
  "xla": XLA's own product (the multiply-reduce or dot above); the accelerator default.

Compilation, apart from the model's math: programs that run once (parameter initialisation, `jit_init`) compile on
XLA:CPU without its backend optimisation. Their cost is the random-number generator, one threefry expansion per
parameter, which XLA:CPU takes 2-3x longer to optimise than to run unoptimised (a tiny codec's init: ~60 s -> ~25 s
of compile on 2 busy cores); their values differ from the optimised program's in the last bit at most.

Choices still made one way for every backend (CPU-tuned; candidates for fields here once a measurement on an
accelerator asks for a second implementation): the KV cache layout [B, Hkv, head_dim, S] (`csm.llama.Attention`)
and layers as an unrolled Python loop rather than a scan (`csm.llama.Transformer`). What a scan would save is
compile time, and little of it: on XLA:CPU the full-size CSM-1B frame step compiles in 4.7 s with its 16 backbone
layers unrolled against 3.3 s with one layer, a 256-row prefill in 1.3 s against 0.4 s (2 quiet cores, session 21).
Sampling has one form everywhere: the top-k threshold is an exact branch-free search (`csm.sampling`), so a
compiled frame holds no conditional.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    """How the model computes on one backend (see the module docstring for each choice)."""

    small_row_products: bool = False
    small_rows: int = 32  # the most rows a small-row product takes (with small_row_products)
    serving_dtype: str = "bfloat16"
    quantized_compute_dtype: str = "bfloat16"
    decode_attention: str = "full"  # "full" | "filled"
    attention_block: int = 256  # cache slots per block of "filled" attention
    int8_kernel: str = "xla"  # "native" | "xla"

    def __post_init__(self) -> None:
        if self.decode_attention not in ("full", "filled"):
            raise ValueError(f"decode_attention must be 'full' or 'filled', got {self.decode_attention!r}")
        if self.int8_kernel not in ("native", "xla"):
            raise ValueError(f"int8_kernel must be 'native' or 'xla', got {self.int8_kernel!r}")
        if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int) \
                or self.attention_block < 1:
            raise ValueError(f"attention_block must be a positive int, got {self.attention_block!r}")
        if not isinstance(self.small_row_products, bool):
            raise TypeError(f"small_row_products must be a bool, got {self.small_row_products!r}")
        if isinstance(self.small_rows, bool) or not isinstance(self.small_rows, int) or self.small_rows < 2:
            raise ValueError(f"small_rows must be an int >= 2, got {self.small_rows!r}")
        for name in ("serving_dtype", "quantized_compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> BackendPolicy:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PolicyOverrides:
    """Config overrides of a BackendPolicy (`engine.backend`): None keeps the backend's default."""

    small_row_products: bool | None = None
    small_rows: int | None = None
    serving_dtype: str | None = None
    quantized_compute_dtype: str | None = None
    decode_attention: str | None = None
    attention_block: int | None = None
    int8_kernel: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_CPU = BackendPolicy(small_row_products=True, serving_dtype="float32", quantized_compute_dtype="float32",
                     decode_attention="filled", int8_kernel="native")
_ACCELERATOR = BackendPolicy(small_row_products=False, quantized_compute_dtype="bfloat16")


# XLA:CPU options for programs that run once (see the module docstring)
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_init(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` for a program that runs once (parameter initialisation): on CPU compiled without
    backend optimisation; elsewhere as any program."""
    import jax

    options = _CPU_INIT_OPTIONS if jax.default_backend() == "cpu" else {}
    return jax.jit(fn, compiler_options=dict(options), **jit_kwargs)


def policy_for(backend: str) -> BackendPolicy:
    """The default policy of a JAX backend name ("cpu", "gpu", "cuda", "rocm", "tpu", ...)."""
    return _CPU if backend.lower() == "cpu" else _ACCELERATOR


def _overrides(overrides: Mapping[str, Any] | PolicyOverrides | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, PolicyOverrides):
        return overrides.as_dict()
    if not isinstance(overrides, Mapping):
        raise TypeError(f"backend overrides must be a mapping, got {overrides!r}")
    known = {f.name for f in dataclasses.fields(BackendPolicy)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown backend policy key(s) {sorted(unknown)}; known: {sorted(known)}")
    return {k: v for k, v in overrides.items() if v is not None}


def resolve(overrides: Mapping[str, Any] | PolicyOverrides | None = None, backend: str | None = None
            ) -> BackendPolicy:
    """`policy_for(backend)` (default: `jax.default_backend()`) with `overrides` applied (None values ignored)."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    return policy_for(backend).replace(**_overrides(overrides))


_configured: dict[str, Any] = {}  # process-wide overrides (`configure`)
_scoped: contextvars.ContextVar[BackendPolicy | None] = contextvars.ContextVar("csm_jax_backend_policy",
                                                                                default=None)


def configure(overrides: Mapping[str, Any] | PolicyOverrides | None) -> BackendPolicy:
    """Set this process's overrides (replacing earlier ones; None or {} restores the backend's defaults) and
    return the resulting policy. Functions already compiled keep the policy they were traced with."""
    global _configured
    new = _overrides(overrides)
    policy = resolve(new)  # validates before anything changes
    _configured = new
    return policy


def current() -> BackendPolicy:
    """The policy in force: a `use` scope's, else the backend's default with `configure`'s overrides."""
    scoped = _scoped.get()
    return scoped if scoped is not None else resolve(_configured)


@contextlib.contextmanager
def use(policy: BackendPolicy | None = None, **overrides: Any) -> Iterator[BackendPolicy]:
    """Within the block (this thread / context), `current()` is `policy` (default: the current one) with
    `overrides` applied."""
    base = current() if policy is None else policy
    chosen = base.replace(**_overrides(overrides))
    token = _scoped.set(chosen)
    try:
        yield chosen
    finally:
        _scoped.reset(token)
