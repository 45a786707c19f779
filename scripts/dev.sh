#!/usr/bin/env bash
# Shared bootstrap for the entry scripts: create .venv and install csm-jax with its test extra if needed.
# Usage: source scripts/dev.sh  (sets $PY to the venv's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CSM_JAX_VENV:-$ROOT/.venv}"
STAMP="$VENV/.csm-jax-installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch is pinned to the CPU build on the same command line as transformers (see README).
  "$PY" -m pip install -q -e "$ROOT[test]"
  touch "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PY ROOT
