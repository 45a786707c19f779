"""Test setup: 8 virtual CPU devices (sharding tests) and no network access to the hub."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["serve_fixtures", "postgres_fixture"]  # server fixtures; throwaway PostgreSQL for the store tests
