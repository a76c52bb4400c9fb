#!/usr/bin/env bash
# Run the test suite (installs what it needs into ./.venv first).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" -m pytest -q "$@"
