#!/usr/bin/env bash
# CI-only install of EleutherAI's lm-evaluation-harness for tests/test_run_tracking.py (idempotent):
# lm_eval itself without its dependency tree, plus exactly the modules its Hugging Face path imports
# (tests/requirements-eval-ci.txt). Users install the full harness with `pip install .[eval]`.
# Needs the project's environment active (source launch/setup_env.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LM_EVAL_VERSION=0.4.13
stamp="${VIRTUAL_ENV:?source launch/setup_env.sh first}/.longcat-eval-installed"
want="$LM_EVAL_VERSION $(sha256sum "$ROOT/tests/requirements-eval-ci.txt" | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" == "$want" ]]; then
    echo "[setup-eval] lm_eval $LM_EVAL_VERSION up to date"
    exit 0
fi
echo "[setup-eval] installing lm_eval $LM_EVAL_VERSION (--no-deps) + tests/requirements-eval-ci.txt"
python -m pip install -q --no-deps "lm_eval==$LM_EVAL_VERSION"
python -m pip install -q -r "$ROOT/tests/requirements-eval-ci.txt"
echo "$want" > "$stamp"
