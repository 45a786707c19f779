"""A native CPU kernel for int8 weight-only products at decode sizes (`int8_gemv.cc`), called through `jax.ffi`.

    if int8_gemv.available():                        # built, registered, AVX512-VNNI fast path compiled in
        y = int8_matmul(x, q, scale)                 # x f32 [..., in], q int8 [out, in], scale f32 [out]

The source is compiled on first use (`g++ -O3 -march=native`) into a cache dir (`$CSM_JAX_KERNEL_CACHE`, default
~/.cache/csm_jax/kernels) under a name keyed by the source, the compiler command and flags, `jax.__version__` and
this CPU's model and flags, written atomically (several processes may build at once). At one row XLA:CPU's int8
product (`csm.llama.linear`) runs at ~1/5 of memory bandwidth, this kernel near it (on two cores: 3-5x faster);
~2x faster than XLA's small-row product at 4-12 rows and 1.3x at 16 (compute-bound there), hence `MAX_ROWS`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemv.cc")
CXX = "g++"  # the compiler command
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
PORTABLE_DEFINE = "-DCSM_INT8_PORTABLE"  # builds the plain C++ loop only (tests)
TARGET = "csm_int8_gemv"
MAX_ROWS = 16  # the most rows `csm.llama.linear` hands the kernel (it wins over XLA's product up to here)


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("CSM_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "csm_jax" / "kernels")


def _cpu_line() -> str:
    """This CPU's model name and flags (/proc/cpuinfo), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))  # the first core's lines (the others repeat them)


def _build(defines: tuple[str, ...]) -> Path:
    """The shared library compiled with `defines` (from the cache when there); raises KernelBuildError."""
    if shutil.which(CXX) is None:
        raise KernelBuildError(f"compiler {CXX!r} not found")
    cmd = [CXX, *FLAGS, *defines, f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *cmd, jax.__version__, _cpu_line()]).encode())
    out = cache_dir() / f"int8_gemv-{key.hexdigest()[:24]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cmd, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_registered: dict[str, ctypes.CDLL] = {}  # FFI target -> its library (kept loaded)
_lock = threading.Lock()


def load(portable: bool = False) -> tuple[str, bool]:
    """Build (once per process) and register the kernel -> (FFI target name, whether the fast path is in it).
    `portable`: the plain C++ build, as target `TARGET + "_portable"`. Raises KernelBuildError."""
    target = TARGET + ("_portable" if portable else "")
    with _lock:
        lib = _registered.get(target)
        if lib is None:
            path = _build((PORTABLE_DEFINE,) if portable else ())
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise KernelBuildError(f"cannot load {path}: {e}") from e
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.CsmInt8Gemv), platform="cpu")
            _registered[target] = lib
    return target, bool(lib.csm_int8_gemv_fast_path())


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with its AVX512-VNNI fast path (cached; never raises: logs one
    warning when not)."""
    try:
        _, fast = load()
    except Exception as e:  # any failure means "use XLA's product"
        logger.warning("csm_jax int8 kernel unavailable, using XLA's int8 product: %s", e)
        return False
    if not fast:
        logger.warning("csm_jax int8 kernel built without its AVX512-VNNI path (CPU lacks it); using XLA's product")
    return fast


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, target: str = TARGET) -> jax.Array:
    """x float32 [..., in] @ (q int8 [out, in] * scale float32 [out, None]).T -> float32 [..., out], on the CPU
    (`target` must be registered: `available()` or `load`). Under vmap the call runs once per batch element."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.astype(jnp.float32).reshape(-1, n_in)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], q.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x2, q.astype(jnp.int8), scale.astype(jnp.float32).reshape(-1)).reshape(*lead, q.shape[0])
