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
# Pretraining, stage 1 of a recipe (launch/stage.sh):
#   MODEL=lite (default): LongCat-Flash-Lite, 8k sequences, plain RoPE, 11T tokens, global batch raised
#                         at 420B tokens (configs/stages/lite_pretrain.yaml)
#   MODEL=flash:          LongCat-Flash, 8k sequences, RoPE base 1e6, ~20T tokens
#                         (configs/stages/flash_pretrain.yaml)
#
#   sbatch launch/pretrain.sh [section.field=value ...]       # on a cluster (submit from the repo root)
#   MODEL=flash sbatch launch/pretrain.sh                      # the Flash recipe
#   bash launch/pretrain.sh [overrides...]                      # the same job on this machine (torchrun)
#   bash launch/pretrain.sh --dry-run [overrides...]            # validate, print the plan and which
#                                                               # recipe values are published / guessed
#
# sbatch options on the command line win over the #SBATCH lines above (sbatch --nodes=64 ...).
# The job log is %x-%j.log in the submission directory, appended across requeues; ranks other than 0
# log to CKPT_DIR/logs/rank-NNNNN.log; `python -m longcat_megatron.status CKPT_DIR` shows the run.
#
# Preemption: 10 minutes before the time limit SLURM sends SIGUSR1 to this script, which passes it to
# the training processes: they finish the step, save, exit 75, and the job requeues itself (same job
# id, SLURM_RESTART_COUNT+1) and resumes from CKPT_DIR with nothing changed. The exit-duration limit
# (time limit - STOP_MARGIN_MINS) does the same a bit earlier; `scancel --signal=USR1 JOBID` does it
# by hand. A crash is not requeued: resubmit and it resumes from the last committed checkpoint.
# See docs/operations.md.
#
# Operator variables (export them). Empty = the recipe files' value; see launch/stage.sh for the list
# (MODEL, TOKEN_BUDGET=11T|11e12, SEQ_LENGTH, GLOBAL_BATCH, LR, parallel sizes, data paths ...).
#   CKPT_DIR        checkpoint directory, used for save AND load (auto-resume) (checkpoints/$MODEL-pretrain)
#   LONGCAT_CPU=1   CPU test mode (gloo, 2 processes per node). Launcher variables (NPROC_PER_NODE,
#                   EXIT_DURATION_MINS, STOP_MARGIN_MINS, MAX_REQUEUES, SAVE_GRACE_S, MARKER_DIR, ...)
#                   are documented in launch/common.sh.

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/launch/common.sh" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
# shellcheck source=launch/common.sh
source "$_root/launch/common.sh" || { echo "cannot find launch/common.sh: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/stage.sh
source "$_root/launch/stage.sh" || { echo "cannot find launch/stage.sh: set LONGCAT_ROOT" >&2; exit 2; }

CKPT_DIR="${CKPT_DIR:-checkpoints/${MODEL:-lite}-pretrain}"
SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
lc_stage pretrain wsd rope
lc_main "$@"
