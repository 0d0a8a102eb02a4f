#!/usr/bin/env bash
# Train on this machine with torchrun (no SLURM): the same launcher as the sbatch scripts.
#
#   bash launch/local.sh NPROC CONFIG [section.field=value ...]
#   bash launch/local.sh 2 configs/tiny.yaml checkpoint.save=runs/tiny/ckpt
#   bash launch/local.sh 1 configs/tiny.yaml --dry-run          # validate + print the plan
#
# Without nvidia-smi the processes use gloo on CPU (LONGCAT_CPU=1); with it NCCL on the GPUs, and a torch
# without usable CUDA is an error naming the cause (set LONGCAT_CPU=1 to run on CPU there anyway).
# Exit code: 0 done, 2 bad config, 75 stopped early (Ctrl-C, SIGTERM/SIGHUP/SIGUSR1 to this script or
# SIGTERM/SIGINT/SIGUSR1 to torchrun, or train.exit_duration_mins): run the same command again and it
# resumes from checkpoint.save. This script passes a signal on to torchrun once and waits; torchrun
# forwards it to the ranks, which save and exit; their helper processes die with them.
# Bound a run:  timeout --preserve-status -s TERM 3600 bash launch/local.sh ...   (exit 75 at expiry;
# without --preserve-status timeout reports 124; give `timeout -k` more than one save)
# The stage recipes run locally too: `bash launch/pretrain.sh` outside an allocation uses torchrun.
if [ $# -lt 2 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
NPROC_PER_NODE="$1"; CONFIG="$2"; shift 2
STAGE_OVERRIDES=()
[ "${1:-}" = --dry-run ] && [ -z "${NNODES:-}" ] && NNODES=1
LONGCAT_NO_SLURM=1   # even inside an allocation (salloc), run here
if [ -z "${LONGCAT_CPU:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then LONGCAT_CPU=1; fi
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lc_main "$@"
