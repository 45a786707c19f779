#!/usr/bin/env bash
# Shared bootstrap for the entry scripts: create .venv and install csm-jax into it when needed.
# Usage: source scripts/dev.sh [runtime|test]  (sets $PY to the venv's python and $ROOT to the repository)
#   runtime: csm-jax and what the server and training need (no torch, transformers, browser driver or test tools)
#   test:    runtime plus the `test` extra (the default, for anyone who sources this file bare)
# The venv is $CSM_JAX_VENV if set, else .venv. Each set has its own stamp in the venv and is installed again when
# pyproject.toml is newer than its stamp. Progress goes to stderr, one line per step; pip itself prints only errors.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CSM_JAX_VENV:-$ROOT/.venv}"
CSM_JAX_SET="${1:-test}"
case "$CSM_JAX_SET" in
  runtime) CSM_JAX_TARGET="$ROOT" ;;
  test) CSM_JAX_TARGET="$ROOT[test]" ;;
  *) echo "csm-jax: scripts/dev.sh takes 'runtime' or 'test', not '$CSM_JAX_SET'" >&2; exit 2 ;;
esac
CSM_JAX_SHOWN="${VENV#"$ROOT"/}"  # .venv, or the full path of a venv outside the repository

# True when the stamp of set $1 exists, is not older than pyproject.toml and names this checkout (a venv shared by
# several checkouts, CSM_JAX_VENV, must import csm_jax from the one being run).
csm_jax_fresh() {
  [ -f "$VENV/.csm-jax-$1" ] && ! [ "$ROOT/pyproject.toml" -nt "$VENV/.csm-jax-$1" ] \
    && [ "$(cat "$VENV/.csm-jax-$1")" = "$ROOT" ]
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "csm-jax: creating $CSM_JAX_SHOWN" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# The test set contains the runtime set, so a fresh test stamp also satisfies `runtime`.
if ! csm_jax_fresh "$CSM_JAX_SET" && ! { [ "$CSM_JAX_SET" = runtime ] && csm_jax_fresh test; }; then
  CSM_JAX_WHY="first run only"
  if [ -f "$VENV/.csm-jax-$CSM_JAX_SET" ]; then
    CSM_JAX_WHY="pyproject.toml changed"
    [ "$(cat "$VENV/.csm-jax-$CSM_JAX_SET")" = "$ROOT" ] || CSM_JAX_WHY="installed from another checkout"
  fi
  echo "csm-jax: installing $CSM_JAX_SET dependencies into $CSM_JAX_SHOWN ($CSM_JAX_WHY)" >&2
  # -qq: pip prints errors only (-q would still print a warning per package for each index location that lacks it).
  # torch is pinned to the CPU build in the test extra, so it resolves on the same command line as transformers.
  if ! "$PY" -m pip install -qq --disable-pip-version-check -e "$CSM_JAX_TARGET"; then
    echo "csm-jax: installing $CSM_JAX_SET dependencies failed (pip's errors are above)" >&2
    exit 1
  fi
  echo "$ROOT" > "$VENV/.csm-jax-$CSM_JAX_SET"
fi
unset CSM_JAX_SET CSM_JAX_TARGET CSM_JAX_SHOWN CSM_JAX_WHY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PY ROOT
