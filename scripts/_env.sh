# Sourced by the other scripts: make sure ./.venv exists and holds this
# project (editable) with its test extras.  Re-installs when pyproject.toml
# changes.  Needs only a Python >= 3.10 on PATH (python3.11 preferred).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${HYBRIDPS_PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${HYBRIDPS_VENV:-$ROOT/.venv}"
STAMP="$VENV/.hybridps-installed"
WANT="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[hybridps] creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[hybridps] installing hybridps and dependencies (torch CUDA build from PyPI: a few minutes the first time)" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
PYTHON="$VENV/bin/python"
