#!/usr/bin/env bash
# Create/refresh the project's virtual environment (idempotent: skips when requirements are unchanged).
# Usage: source launch/setup_env.sh   (exports PATH so that `python` is the venv's)
# Env: LONGCAT_VENV (default: <repo>/.venv), PYTHON (default: python3.11 or python3).
set -euo pipefail
_LC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LONGCAT_VENV="${LONGCAT_VENV:-$_LC_ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
_stamp="$LONGCAT_VENV/.longcat-installed"
_want="$(cat "$_LC_ROOT/requirements.txt" "$_LC_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ ! -x "$LONGCAT_VENV/bin/python" ]]; then
    echo "[setup] creating virtual environment $LONGCAT_VENV"
    "$PYTHON" -m venv "$LONGCAT_VENV"
fi
if [[ "$(cat "$_stamp" 2>/dev/null || true)" != "$_want" ]]; then
    echo "[setup] installing requirements (torch CPU wheel, megatron-core, ...)"
    "$LONGCAT_VENV/bin/python" -m pip install -q --upgrade pip
    "$LONGCAT_VENV/bin/python" -m pip install -q -r "$_LC_ROOT/requirements.txt"
    "$LONGCAT_VENV/bin/python" -m pip install -q --no-deps -e "$_LC_ROOT"
    echo "$_want" > "$_stamp"
else
    echo "[setup] environment up to date ($LONGCAT_VENV)"
fi
export PATH="$LONGCAT_VENV/bin:$PATH"
export VIRTUAL_ENV="$LONGCAT_VENV"
export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
