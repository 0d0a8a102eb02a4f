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
# Supervised fine-tuning on packed chat data with loss masks (loss on assistant tokens only), starting
# from the mid-training checkpoint with a fresh optimizer and LR schedule.
#
#   sbatch launch/sft.sh [overrides...]   |   bash launch/sft.sh [--dry-run] [overrides...]
#
# Data: SFT_DATA_PATHS = prefixes made by `python -m data_tools.sft` (PREFIX.bin/.idx and
# PREFIX_loss_mask.bin/.idx), blend syntax "[0.5,/d/chat,0.5,/d/tools]". SFT_DATA_FLAGS holds the
# data settings that select packed-SFT reading (default: data.sft=true data.reset_position_ids=true).
# Start/resume as in launch/midtrain.sh: weights from INIT_FROM until CKPT_DIR has a checkpoint.
#
# Operator variables (empty = the config file's value):
#   CONFIG, CKPT_DIR, INIT_FROM (midtrain CKPT_DIR), FRESH_OPTIMIZER (1), TOKENIZER
#   SEQ_LENGTH (131072; must equal data_tools.sft --seq-length), GLOBAL_BATCH (32), MICRO_BATCH (1)
#   EPOCHS_TOKENS: token budget (TOKEN_BUDGET, default 20e9) or TRAIN_ITERS directly
#   LR (2e-5), MIN_LR (2e-6), WARMUP_ITERS (50), SCHEDULE (cosine)
#   TP, PP, VPP, CP (8), EP, SEQUENCE_PARALLEL;  SAVE_INTERVAL (200), TENSORBOARD_DIR
#   LONGCAT_CPU=1 and the launcher variables: see launch/common.sh

CONFIG="${CONFIG:-configs/longcat_flash_lite.yaml}"
CKPT_DIR="${CKPT_DIR:-checkpoints/flash-lite-sft}"
INIT_FROM="${INIT_FROM:-checkpoints/flash-lite-midtrain}"
FRESH_OPTIMIZER="${FRESH_OPTIMIZER:-1}"
SFT_DATA_PATHS="${SFT_DATA_PATHS:-}"
SFT_DATA_FLAGS="${SFT_DATA_FLAGS:-data.sft=true data.reset_position_ids=true}"
TOKENIZER="${TOKENIZER:-}"
SEQ_LENGTH="${SEQ_LENGTH:-131072}"
GLOBAL_BATCH="${GLOBAL_BATCH:-32}"
MICRO_BATCH="${MICRO_BATCH:-1}"
TOKEN_BUDGET="${TOKEN_BUDGET:-20000000000}"
TRAIN_ITERS="${TRAIN_ITERS:-}"
LR="${LR:-2e-5}" MIN_LR="${MIN_LR:-2e-6}"
WARMUP_ITERS="${WARMUP_ITERS:-50}"
SCHEDULE="${SCHEDULE:-cosine}"
TP="${TP:-}" PP="${PP:-}" VPP="${VPP:-}" CP="${CP:-8}" EP="${EP:-}" SEQUENCE_PARALLEL="${SEQUENCE_PARALLEL:-}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }

TRAIN_ITERS="${TRAIN_ITERS:-$(lc_ceil_div "$TOKEN_BUDGET" $(( GLOBAL_BATCH * SEQ_LENGTH )))}"
STAGE_OVERRIDES=(
    data.seq_length="$SEQ_LENGTH"
    train.global_batch_size="$GLOBAL_BATCH" train.micro_batch_size="$MICRO_BATCH"
    train.train_iters="$TRAIN_ITERS"
    optimizer.lr="$LR" optimizer.min_lr="$MIN_LR"
    schedule.style="$SCHEDULE" schedule.warmup_iters="$WARMUP_ITERS"
    checkpoint.save="$CKPT_DIR" checkpoint.save_interval="$SAVE_INTERVAL"
)
# shellcheck disable=SC2206  # word-splitting the flag list is intended
[ -n "$SFT_DATA_FLAGS" ] && STAGE_OVERRIDES+=($SFT_DATA_FLAGS)
[ -n "$SFT_DATA_PATHS" ] && STAGE_OVERRIDES+=(data.paths="$SFT_DATA_PATHS" data.mock=false)
lc_set_parallel
lc_set data.tokenizer "$TOKENIZER"; lc_set logging.tensorboard_dir "$TENSORBOARD_DIR"
if [ "${1:-}" != --dry-run ]; then
    _init="$(lc_init_from "$CKPT_DIR" "$INIT_FROM" "$FRESH_OPTIMIZER")" || exit 2
    [ -n "$_init" ] && mapfile -t -O "${#STAGE_OVERRIDES[@]}" STAGE_OVERRIDES <<< "$_init"
fi

LC_CKPT_DIR="$CKPT_DIR"
lc_main "$@"
