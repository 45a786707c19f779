#!/usr/bin/env bash
# Run the test suite. Extra arguments go to pytest. On first use it creates .venv and installs csm-jax with its test
# extra (torch, transformers, Playwright, notebooks, evaluation tools), then the Debian packages below.
# Two passes: the tests that need the machine to themselves (`serial`: the CSM-1B parity, ~18 GB of RAM) one at a
# time, then the rest (the full-size Mimi ones included, ~4 GB) on $CSM_JAX_TEST_WORKERS pytest-xdist workers
# (default 2), each test file on one worker: most tests wait on compilers, subprocesses and sockets as much as they
# compute. Exit status: the worse pass's (a pass that selects no test counts as passed when the other ran some).
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
set +e
"$PY" -m pytest -m serial "$@"; first=$?
"$PY" -m pytest -m "not serial" -n "${CSM_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"; second=$?
set -e
[ "$first" -eq 5 ] && [ "$second" -eq 5 ] && exit 5  # pytest: no tests collected
[ "$first" -eq 5 ] && first=0
[ "$second" -eq 5 ] && second=0
exit $(( first > second ? first : second ))
