"""Test setup: 8 virtual CPU devices (sharding tests; tests/xla_env.py), no network access to the hub, and one
persistent XLA compilation cache for the session, shared by every process the tests start (servers, training runs)
on both xdist workers: the same programs compile once per run instead of once per process."""

import atexit
import os
import shutil
import tempfile

from xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # fresh per session: nothing carries over between runs
    _cache = tempfile.mkdtemp(prefix="csm_jax_test_xla_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["serve_fixtures", "postgres_fixture"]  # server fixtures; throwaway PostgreSQL for the store tests
