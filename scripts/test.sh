#!/usr/bin/env bash
# Run the test suite (sets up .venv on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dev.sh"
cd "$ROOT"
# System tools the tests use: Debian's Chromium for the web client (never Playwright's own download) and
# espeak-ng for the real speech corpus of the training and evaluation tests.
if [ ! -x /usr/bin/chromium ] || ! command -v espeak-ng >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium espeak-ng >/dev/null
fi
exec "$PY" -m pytest "$@"
