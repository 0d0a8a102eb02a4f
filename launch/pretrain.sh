#!/usr/bin/env bash
#SBATCH --job-name=longcat-pretrain
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
# LongCat-Flash-Lite pretraining: 8k sequences, plain RoPE, an 11T-token budget, WSD schedule.
#
#   sbatch launch/pretrain.sh [section.field=value ...]       # on a cluster (submit from the repo root)
#   bash launch/pretrain.sh [overrides...]                      # the same job on this machine (torchrun)
#   bash launch/pretrain.sh --dry-run [overrides...]            # validate + print the plan, no training
#
# sbatch options on the command line win over the #SBATCH lines above (sbatch --nodes=64 ...).
# The job log is %x-%j.log in the submission directory, appended across requeues.
#
# Preemption: 10 minutes before the time limit SLURM sends SIGUSR1 to this script, which passes it to
# the training processes: they finish the step, save, exit 75, and the job requeues itself (same job
# id, SLURM_RESTART_COUNT+1) and resumes from CKPT_DIR with nothing changed. The exit-duration limit
# (time limit - STOP_MARGIN_MINS) does the same a bit earlier; `scancel --signal=USR1 JOBID` does it
# by hand. A crash is not requeued: resubmit and it resumes from the last committed checkpoint.
# See docs/operations.md.
#
# Operator variables (export them, or edit the defaults below). Empty = the config file's value.
#   CONFIG          model/run config                    (configs/longcat_flash_lite.yaml)
#   CKPT_DIR        checkpoint directory, used for save AND load (auto-resume)
#   DATA_PATHS      indexed-dataset prefixes, Megatron blend syntax: "[0.7,/d/web,0.3,/d/code]"
#   DATA_CACHE_DIR  sample-index cache (put it on shared storage); TOKENIZER: tokenizer directory
#   SEQ_LENGTH      8192
#   GLOBAL_BATCH    sequences per step (1024 -> 8.4M tokens per step); MICRO_BATCH per rank (1)
#   TOKEN_BUDGET    11e12; TRAIN_ITERS = ceil(TOKEN_BUDGET / (GLOBAL_BATCH * SEQ_LENGTH)) unless set
#   LR, MIN_LR, WARMUP_ITERS, WSD_DECAY_FRACTION (share of TRAIN_ITERS in the final decay: 0.1)
#   ROPE_TYPE       rope (8k pretraining runs without YaRN; midtrain.sh switches it on)
#   TP, PP, VPP, CP, EP, SEQUENCE_PARALLEL   parallel layout (DP = world / (TP*PP*CP))
#   SAVE_INTERVAL   iterations between checkpoints (500); TENSORBOARD_DIR
#   LONGCAT_CPU=1   CPU test mode (gloo, 2 processes per node). Launcher variables (NPROC_PER_NODE,
#                   EXIT_DURATION_MINS, STOP_MARGIN_MINS, MAX_REQUEUES, SAVE_GRACE_S, MARKER_DIR, ...)
#                   are documented in launch/common.sh.

CONFIG="${CONFIG:-configs/longcat_flash_lite.yaml}"
CKPT_DIR="${CKPT_DIR:-checkpoints/flash-lite-pretrain}"
DATA_PATHS="${DATA_PATHS:-}"
DATA_CACHE_DIR="${DATA_CACHE_DIR:-}"
TOKENIZER="${TOKENIZER:-}"
SEQ_LENGTH="${SEQ_LENGTH:-8192}"
GLOBAL_BATCH="${GLOBAL_BATCH:-1024}"
MICRO_BATCH="${MICRO_BATCH:-1}"
TOKEN_BUDGET="${TOKEN_BUDGET:-11000000000000}"
TRAIN_ITERS="${TRAIN_ITERS:-}"
LR="${LR:-}" MIN_LR="${MIN_LR:-}"
WARMUP_ITERS="${WARMUP_ITERS:-2000}"
WSD_DECAY_FRACTION="${WSD_DECAY_FRACTION:-0.1}"
ROPE_TYPE="${ROPE_TYPE:-rope}"
TP="${TP:-}" PP="${PP:-}" VPP="${VPP:-}" CP="${CP:-}" EP="${EP:-}" SEQUENCE_PARALLEL="${SEQUENCE_PARALLEL:-}"
SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }

TRAIN_ITERS="${TRAIN_ITERS:-$(lc_ceil_div "$TOKEN_BUDGET" $(( GLOBAL_BATCH * SEQ_LENGTH )))}"
STAGE_OVERRIDES=(
    data.seq_length="$SEQ_LENGTH" model.rope_type="$ROPE_TYPE"
    train.global_batch_size="$GLOBAL_BATCH" train.micro_batch_size="$MICRO_BATCH"
    train.train_iters="$TRAIN_ITERS"
    schedule.style=wsd schedule.warmup_iters="$WARMUP_ITERS"
    schedule.wsd_decay_iters="$(lc_wsd_decay_iters "$TRAIN_ITERS" "$WSD_DECAY_FRACTION")"
    checkpoint.save="$CKPT_DIR" checkpoint.save_interval="$SAVE_INTERVAL"
)
lc_set optimizer.lr "$LR"; lc_set optimizer.min_lr "$MIN_LR"
lc_set_parallel
[ -n "$DATA_PATHS" ] && STAGE_OVERRIDES+=(data.paths="$DATA_PATHS" data.mock=false)
lc_set data.cache_dir "$DATA_CACHE_DIR"; lc_set data.tokenizer "$TOKENIZER"
lc_set logging.tensorboard_dir "$TENSORBOARD_DIR"

LC_CKPT_DIR="$CKPT_DIR"
lc_main "$@"
