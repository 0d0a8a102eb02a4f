# Sourced by the single-command tool scripts (preprocess.sh, evaluate.sh) once they have set _root to
# the repository: the project's virtual environment (if not already active) and the import path.
LONGCAT_VENV="${LONGCAT_VENV:-$_root/.venv}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$LONGCAT_VENV/bin/python" ]; then
    export VIRTUAL_ENV="$LONGCAT_VENV" PATH="$LONGCAT_VENV/bin:$PATH"
fi
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
