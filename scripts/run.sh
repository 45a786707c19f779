#!/usr/bin/env bash
# The main job (sets up .venv on first use). Today: a Mimi round trip (audio -> RVQ codes -> streaming-capable
# decoder -> audio) of a bundled speech clip with the checkpoint in $CSM_JAX_MIMI, or seeded random weights.
# Extra arguments go to `python -m csm_jax.codec roundtrip`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh"
cd "$ROOT"
mkdir -p outputs
exec "$PY" -m csm_jax.codec roundtrip tests/data/speech_3s.wav outputs/roundtrip.wav \
  --checkpoint "${CSM_JAX_MIMI:-random}" "$@"
