#!/usr/bin/env bash
# The main job: the conversation server on the default model, or on the checkpoint given as `model.path=...`. Extra
# arguments are Hydra overrides of configs/serve.yaml, e.g. server.port=9000. On first use it creates .venv and
# installs the runtime dependencies only (scripts/test.sh adds the test extra).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh" runtime
cd "$ROOT"
echo "csm-jax: starting the server (it prints a line when it is ready)" >&2
exec "$PY" -m serve "$@"
