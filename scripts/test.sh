#!/usr/bin/env bash
# Run the test suite. Extra arguments go to pytest. On first use it creates .venv and installs csm-jax with its test
# extra (torch, transformers, Playwright, notebooks, evaluation tools), then the Debian packages below.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh" test
cd "$ROOT"
# System tools the tests use: Debian's Chromium for the web client (never Playwright's own download), espeak-ng for
# the real speech corpus of the training and evaluation tests, and flite and festival with three voices for the
# multi-speaker speech corpus, and the PostgreSQL server for the store suite's second backend (the tests run their
# own throwaway clusters with its binaries, tests/postgres_fixture.py; they do not use the system's service), and g++
# for the native int8 kernel (csm_jax/kernels, built on first use).
APT_PACKAGES="chromium espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts postgresql g++"
if ! dpkg -s $APT_PACKAGES >/dev/null 2>&1; then
  echo "csm-jax: installing system packages (apt): $APT_PACKAGES" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $APT_PACKAGES >/dev/null
fi
exec "$PY" -m pytest "$@"
