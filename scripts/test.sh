#!/usr/bin/env bash
# Run the test suite (sets up .venv on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
