#!/usr/bin/env bash
#SBATCH --job-name=longcat-sft
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Supervised fine-tuning, stage 4 of a recipe (launch/stage.sh), on packed chat data with loss masks
# (loss on assistant tokens only), starting from the 128k mid-training checkpoint with a fresh
# optimizer and LR schedule. MODEL=lite (default) | flash: configs/stages/${MODEL}_sft.yaml. No SFT
# setting is published: every value there is a labelled guess.
#
#   sbatch launch/sft.sh [overrides...]   |   bash launch/sft.sh [--dry-run] [overrides...]
#
# Data: SFT_DATA_PATHS = prefixes made by `python -m data_tools.sft` (PREFIX.bin/.idx and
# PREFIX_loss_mask.bin/.idx), blend syntax "[0.5,/d/chat,0.5,/d/tools]".
# Packed conversations: position ids restart per conversation; at 128k the attention between packed
# conversations is NOT masked (a dense [s, s] mask is limited to 8k; docs/operations.md).
# Start/resume as in launch/midtrain.sh: weights from INIT_FROM until CKPT_DIR has a checkpoint.
#
# Operator variables (empty = the recipe files' value; the common ones in launch/stage.sh):
#   CKPT_DIR (checkpoints/$MODEL-sft), INIT_FROM (checkpoints/$MODEL-midtrain-128k), FRESH_OPTIMIZER (1),
#   SFT_DATA_PATHS, MODEL, TOKEN_BUDGET (the SFT token budget: 20B, 2e10 ...) or TRAIN_ITERS,
#   SEQ_LENGTH (must equal data_tools.sft --seq-length), GLOBAL_BATCH, LR, CP ...
#   LONGCAT_CPU=1 and the launcher variables: see launch/common.sh

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/stage.sh
source "$_root/launch/stage.sh" || { echo "cannot find launch/stage.sh: set LONGCAT_ROOT" >&2; exit 2; }

CKPT_DIR="${CKPT_DIR:-checkpoints/${MODEL:-lite}-sft}"
INIT_FROM="${INIT_FROM:-checkpoints/${MODEL:-lite}-midtrain-128k}"
FRESH_OPTIMIZER="${FRESH_OPTIMIZER:-1}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"
DATA_PATHS="${SFT_DATA_PATHS:-${DATA_PATHS:-}}"
SFT_DATA_FLAGS="${SFT_DATA_FLAGS:-data.sft=true data.reset_position_ids=true data.reset_attention_mask=true}"  # used without a stage file
lc_stage sft cosine ""
# shellcheck disable=SC2206  # word-splitting the flag list is intended
[ -z "$STAGE_FILE" ] && [ -n "$SFT_DATA_FLAGS" ] && STAGE_OVERRIDES+=($SFT_DATA_FLAGS)
if [ "${1:-}" != --dry-run ]; then
    _init="$(lc_init_from "$CKPT_DIR" "$INIT_FROM" "$FRESH_OPTIMIZER")" || exit 2
    [ -n "$_init" ] && mapfile -t -O "${#STAGE_OVERRIDES[@]}" STAGE_OVERRIDES <<< "$_init"
fi
lc_main "$@"
