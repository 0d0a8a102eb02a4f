#!/usr/bin/env bash
# Submit a whole recipe (e.g. pretraining -> mid-training -> SFT) as SLURM jobs that run one after
# the other: each stage is `sbatch --dependency=afterok:<previous stage>` (a requeued stage keeps its
# dependents waiting; a stage that fails for good cancels them: --kill-on-invalid-dep=yes).
#
#   bash launch/recipe.sh [--print] RUN_DIR [STAGE ... [-- STAGE ...]]
#   STAGE = NAME SCRIPT [VAR=VALUE ...] [section.field=value ...]
#
#   bash launch/recipe.sh /shared/runs/lite                    # pretrain -> midtrain 32k -> 128k -> sft (defaults)
#   bash launch/recipe.sh /shared/runs/lite pretrain launch/pretrain.sh TOKEN_BUDGET=1e12 \
#        -- midtrain launch/midtrain.sh FRESH_OPTIMIZER=0 LR=1e-4 -- sft launch/sft.sh
#
# Stage NAME's checkpoints go to RUN_DIR/NAME (its CKPT_DIR); it starts from the previous stage's
# RUN_DIR/PREVIOUS (its INIT_FROM) and, once it has a checkpoint of its own, requeues and
# resubmissions resume that one (launch/common.sh lc_init_from; training resumes checkpoint.save
# before checkpoint.load). Logs: RUN_DIR/logs/NAME-JOBID.log. VAR=VALUE (upper-case names) are
# environment variables of that stage only (its recipe variables: LR, TRAIN_ITERS, FRESH_OPTIMIZER, ...);
# section.field=value are config overrides passed to its script. Exported variables reach every stage.
# SBATCH_ARGS (e.g. "--nodes=64 --account=abc") go to every sbatch; RECIPE_NAME prefixes the job
# names (default: basename of RUN_DIR). FIRST_DEPENDENCY=JOBID makes the first stage wait for a job.
# --print shows the sbatch commands without submitting. Prints "NAME JOBID" per submitted stage.
set -euo pipefail

PRINT=0
if [ "${1:-}" = --print ]; then PRINT=1; shift; fi
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"; shift
[ $# -gt 0 ] || set -- pretrain launch/pretrain.sh -- midtrain-32k launch/midtrain.sh STAGE=32k \
    -- midtrain-128k launch/midtrain.sh STAGE=128k -- sft launch/sft.sh
NAME="${RECIPE_NAME:-$(basename "$RUN_DIR")}"
mkdir -p "$RUN_DIR/logs"
cd "$ROOT"   # the jobs find the code through $SLURM_SUBMIT_DIR

previous_dir="" previous_job="${FIRST_DEPENDENCY:-}"
submit_stage() {  # NAME SCRIPT [VAR=VALUE | section.field=value ...]
    local stage="$1" script="$2"; shift 2
    [ -f "$script" ] || { echo "[recipe] error: stage '$stage': script '$script' does not exist" >&2; exit 2; }
    local env_vars=("CKPT_DIR=$RUN_DIR/$stage") args=() arg
    [ -n "$previous_dir" ] && env_vars+=("INIT_FROM=$previous_dir")
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Z_][A-Z0-9_]*= ]]; then env_vars+=("$arg"); else args+=("$arg"); fi
    done
    local sbatch=(sbatch --parsable --job-name="$NAME-$stage" --output="$RUN_DIR/logs/$stage-%j.log")
    [ -n "$previous_job" ] && sbatch+=(--dependency="afterok:$previous_job" --kill-on-invalid-dep=yes)
    # shellcheck disable=SC2206  # SBATCH_ARGS is a list of options
    sbatch+=(${SBATCH_ARGS:-} "$script" "${args[@]}")
    if [ "$PRINT" = 1 ]; then
        echo "[recipe] $stage: env ${env_vars[*]} ${sbatch[*]}"
        previous_job="<$stage>"
    else
        local out
        out="$(env "${env_vars[@]}" "${sbatch[@]}")" || { echo "[recipe] error: sbatch of stage '$stage' failed" >&2; exit 1; }
        previous_job="${out%%;*}"
        echo "$stage $previous_job"
    fi
    previous_dir="$RUN_DIR/$stage"
}

stage=()
for arg in "$@" --; do
    if [ "$arg" = -- ]; then
        [ "${#stage[@]}" -ge 2 ] || { echo "[recipe] error: a stage needs NAME SCRIPT (got '${stage[*]:-}')" >&2; exit 2; }
        submit_stage "${stage[@]}"
        stage=()
    else
        stage+=("$arg")
    fi
done
