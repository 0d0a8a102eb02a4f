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
# LongCat-Flash-Lite mid-training: 128k sequences with YaRN RoPE scaling and context parallelism,
# starting from the pretraining checkpoint, with its own token budget (1.5T tokens).
#
#   sbatch launch/midtrain.sh [overrides...]   |   bash launch/midtrain.sh [--dry-run] [overrides...]
#
# Start: when CKPT_DIR has no committed checkpoint, the weights come from INIT_FROM (the pretraining
# CKPT_DIR); the stage has its own iteration counter, LR schedule and TRAIN_ITERS. FRESH_OPTIMIZER=1
# (default): fresh Adam state (checkpoint.finetune=true); FRESH_OPTIMIZER=0: keep pretraining's Adam
# state (checkpoint.reset_schedule=true). Once CKPT_DIR holds a checkpoint, requeues and
# resubmissions resume it instead. Preemption/requeue as in launch/pretrain.sh.
#
# Operator variables (empty = the config file's value):
#   CONFIG, CKPT_DIR, INIT_FROM, FRESH_OPTIMIZER, DATA_PATHS, DATA_CACHE_DIR, TOKENIZER
#   SEQ_LENGTH     131072
#   GLOBAL_BATCH   sequences per step (64 -> 8.4M tokens); MICRO_BATCH (1)
#   TOKEN_BUDGET   1.5e12; TRAIN_ITERS = ceil(TOKEN_BUDGET / (GLOBAL_BATCH * SEQ_LENGTH)) unless set
#   LR (1e-4), MIN_LR (1e-5), WARMUP_ITERS (200), WSD_DECAY_FRACTION (0.2)
#   RoPE/YaRN, explicit:  ROPE_BASE (5e6), YARN_FACTOR (10), YARN_ORIGINAL_MAX (32768),
#                         YARN_BETA_FAST (32), YARN_BETA_SLOW (1), YARN_MSCALE (1), YARN_MSCALE_ALL_DIM (1),
#                         MAX_POSITION (YARN_FACTOR * YARN_ORIGINAL_MAX). The defaults are the released
#                         LongCat-Flash-Lite values; pretraining ran at 8k without YaRN.
#   TP, PP, VPP, CP (8), EP, SEQUENCE_PARALLEL;  SAVE_INTERVAL (200), TENSORBOARD_DIR
#   LONGCAT_CPU=1 and the launcher variables: see launch/common.sh

CONFIG="${CONFIG:-configs/longcat_flash_lite.yaml}"
CKPT_DIR="${CKPT_DIR:-checkpoints/flash-lite-midtrain}"
INIT_FROM="${INIT_FROM:-checkpoints/flash-lite-pretrain}"
FRESH_OPTIMIZER="${FRESH_OPTIMIZER:-1}"
DATA_PATHS="${DATA_PATHS:-}" DATA_CACHE_DIR="${DATA_CACHE_DIR:-}" TOKENIZER="${TOKENIZER:-}"
SEQ_LENGTH="${SEQ_LENGTH:-131072}"
GLOBAL_BATCH="${GLOBAL_BATCH:-64}"
MICRO_BATCH="${MICRO_BATCH:-1}"
TOKEN_BUDGET="${TOKEN_BUDGET:-1500000000000}"
TRAIN_ITERS="${TRAIN_ITERS:-}"
LR="${LR:-1e-4}" MIN_LR="${MIN_LR:-1e-5}"
WARMUP_ITERS="${WARMUP_ITERS:-200}"
WSD_DECAY_FRACTION="${WSD_DECAY_FRACTION:-0.2}"
ROPE_BASE="${ROPE_BASE:-5000000}"
YARN_FACTOR="${YARN_FACTOR:-10}"
YARN_ORIGINAL_MAX="${YARN_ORIGINAL_MAX:-32768}"
YARN_BETA_FAST="${YARN_BETA_FAST:-32}" YARN_BETA_SLOW="${YARN_BETA_SLOW:-1}"
YARN_MSCALE="${YARN_MSCALE:-1}" YARN_MSCALE_ALL_DIM="${YARN_MSCALE_ALL_DIM:-1}"
TP="${TP:-}" PP="${PP:-}" VPP="${VPP:-}" CP="${CP:-8}" EP="${EP:-}" SEQUENCE_PARALLEL="${SEQUENCE_PARALLEL:-}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }

MAX_POSITION="${MAX_POSITION:-$(awk -v f="$YARN_FACTOR" -v m="$YARN_ORIGINAL_MAX" 'BEGIN { printf "%d", f * m }')}"
TRAIN_ITERS="${TRAIN_ITERS:-$(lc_ceil_div "$TOKEN_BUDGET" $(( GLOBAL_BATCH * SEQ_LENGTH )))}"
STAGE_OVERRIDES=(
    data.seq_length="$SEQ_LENGTH"
    model.max_position_embeddings="$MAX_POSITION" model.rotary_base="$ROPE_BASE"
    model.rope_type=yarn model.yarn_factor="$YARN_FACTOR"
    model.yarn_original_max_position_embeddings="$YARN_ORIGINAL_MAX"
    model.yarn_beta_fast="$YARN_BETA_FAST" model.yarn_beta_slow="$YARN_BETA_SLOW"
    model.yarn_mscale="$YARN_MSCALE" model.yarn_mscale_all_dim="$YARN_MSCALE_ALL_DIM"
    train.global_batch_size="$GLOBAL_BATCH" train.micro_batch_size="$MICRO_BATCH"
    train.train_iters="$TRAIN_ITERS"
    optimizer.lr="$LR" optimizer.min_lr="$MIN_LR"
    schedule.style=wsd schedule.warmup_iters="$WARMUP_ITERS"
    schedule.wsd_decay_iters="$(lc_wsd_decay_iters "$TRAIN_ITERS" "$WSD_DECAY_FRACTION")"
    checkpoint.save="$CKPT_DIR" checkpoint.save_interval="$SAVE_INTERVAL"
)
lc_set_parallel
[ -n "$DATA_PATHS" ] && STAGE_OVERRIDES+=(data.paths="$DATA_PATHS" data.mock=false)
lc_set data.cache_dir "$DATA_CACHE_DIR"; lc_set data.tokenizer "$TOKENIZER"
lc_set logging.tensorboard_dir "$TENSORBOARD_DIR"
if [ "${1:-}" != --dry-run ]; then
    _init="$(lc_init_from "$CKPT_DIR" "$INIT_FROM" "$FRESH_OPTIMIZER")" || exit 2
    [ -n "$_init" ] && mapfile -t -O "${#STAGE_OVERRIDES[@]}" STAGE_OVERRIDES <<< "$_init"
fi

LC_CKPT_DIR="$CKPT_DIR"
lc_main "$@"
