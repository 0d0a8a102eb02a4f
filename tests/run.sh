#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite.
# Usage: bash tests/run.sh [pytest args...]     e.g. bash tests/run.sh -k resume
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh
# A real one-node SLURM on localhost for the launch tests (skipped by those tests if unavailable).
if [[ -x tests/slurm/setup.sh && "${LONGCAT_SKIP_SLURM:-0}" != "1" ]]; then
    bash tests/slurm/setup.sh || echo "[tests] SLURM setup failed: SLURM tests will be skipped"
fi
start=$(date +%s)
set +e
python -m pytest -q -ra --durations=15 "$@"
rc=$?
set -e
echo "[tests] finished in $(( $(date +%s) - start ))s (pytest exit code $rc)"
if [[ $rc -eq 5 ]]; then
    echo "[tests] no tests were collected: treating as failure"
    exit 1
fi
exit $rc
