#!/usr/bin/env bash
#SBATCH --job-name=longcat-midtrain
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Mid-training (long context), stages 2 and 3 of a recipe (launch/stage.sh), STAGE=32k then STAGE=128k:
#   MODEL=lite (default): STAGE=32k: 32k sequences with YaRN switched on (factor 10 over 32768);
#                         STAGE=128k: 128k sequences; 1.5T tokens in all (split 1.2T / 0.3T: a guess)
#                         (configs/stages/lite_midtrain_{32k,128k}.yaml)
#   MODEL=flash:          STAGE=32k: 80B tokens at 32k, RoPE base 5e6; STAGE=128k: 20B tokens at
#                         128k, base 1e7 (configs/stages/flash_midtrain_{32k,128k}.yaml)
#
#   STAGE=32k sbatch launch/midtrain.sh [overrides...]   |   STAGE=128k bash launch/midtrain.sh [--dry-run]
#
# Start: when CKPT_DIR has no committed checkpoint, the weights come from INIT_FROM (STAGE=32k: the
# pretraining CKPT_DIR; STAGE=128k: the 32k stage's). FRESH_OPTIMIZER=1 (default): fresh optimizer, LR
# schedule and iteration counter (checkpoint.finetune=true). FRESH_OPTIMIZER=0: keep the previous
# stage's Adam state, with the stage's own iteration counter and LR schedule (checkpoint.reset_schedule=true). Once CKPT_DIR holds a checkpoint, requeues and resubmissions resume it
# instead. Preemption/requeue as in launch/pretrain.sh.
#
# Operator variables (empty = the recipe files' value; the common ones in launch/stage.sh):
#   STAGE (32k | 128k), CKPT_DIR (checkpoints/$MODEL-midtrain-$STAGE), INIT_FROM, FRESH_OPTIMIZER,
#   MODEL, TOKEN_BUDGET (80B, 1.2T, 1.5e12 ...), SEQ_LENGTH, GLOBAL_BATCH, LR, CP ...; RoPE/YaRN values
#   are in the stage file (override them on the command line, e.g. model.rotary_base=1e7)
#   LONGCAT_CPU=1 and the launcher variables: see launch/common.sh

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/stage.sh
source "$_root/launch/stage.sh" || { echo "cannot find launch/stage.sh: set LONGCAT_ROOT" >&2; exit 2; }

STAGE="${STAGE:-32k}"
case "$STAGE" in
    32k) _prev="checkpoints/${MODEL:-lite}-pretrain" ;;
    128k) _prev="checkpoints/${MODEL:-lite}-midtrain-32k" ;;
    *) lc_die "STAGE=$STAGE: use STAGE=32k or STAGE=128k" ;;
esac
CKPT_DIR="${CKPT_DIR:-checkpoints/${MODEL:-lite}-midtrain-$STAGE}"
INIT_FROM="${INIT_FROM:-$_prev}"
FRESH_OPTIMIZER="${FRESH_OPTIMIZER:-1}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"
lc_stage "midtrain_$STAGE" wsd ""
# Optional RoPE/YaRN overrides (empty = the stage file's values): ROPE_BASE, YARN_FACTOR,
# YARN_ORIGINAL_MAX, YARN_BETA_FAST, YARN_BETA_SLOW, YARN_MSCALE, YARN_MSCALE_ALL_DIM, MAX_POSITION
# (default with YARN_FACTOR and YARN_ORIGINAL_MAX: their product).
if [ -n "${YARN_FACTOR:-}" ] && [ -n "${YARN_ORIGINAL_MAX:-}" ] && [ -z "${MAX_POSITION:-}" ]; then
    MAX_POSITION="$(awk -v f="$YARN_FACTOR" -v m="$YARN_ORIGINAL_MAX" 'BEGIN { printf "%d", f * m }')"
fi
lc_set model.max_position_embeddings "${MAX_POSITION:-}"; lc_set model.rotary_base "${ROPE_BASE:-}"
[ -n "${YARN_FACTOR:-}" ] && STAGE_OVERRIDES+=(model.rope_type=yarn model.yarn_factor="$YARN_FACTOR")
lc_set model.yarn_original_max_position_embeddings "${YARN_ORIGINAL_MAX:-}"
lc_set model.yarn_beta_fast "${YARN_BETA_FAST:-}"; lc_set model.yarn_beta_slow "${YARN_BETA_SLOW:-}"
lc_set model.yarn_mscale "${YARN_MSCALE:-}"; lc_set model.yarn_mscale_all_dim "${YARN_MSCALE_ALL_DIM:-}"
if [ "${1:-}" != --dry-run ]; then
    _init="$(lc_init_from "$CKPT_DIR" "$INIT_FROM" "$FRESH_OPTIMIZER")" || exit 2
    [ -n "$_init" ] && mapfile -t -O "${#STAGE_OVERRIDES[@]}" STAGE_OVERRIDES <<< "$_init"
fi
lc_main "$@"
