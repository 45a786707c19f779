#!/usr/bin/env bash
# The main job (sets up .venv on first use): the conversation server on the default model, or on the checkpoint
# given as `model.path=...`. Extra arguments are Hydra overrides of configs/serve.yaml, e.g. server.port=9000.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh"
cd "$ROOT"
exec "$PY" -m serve "$@"
