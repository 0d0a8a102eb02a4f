#!/usr/bin/env bash
#SBATCH --job-name=longcat-study
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.log
#
# The embedding-scaling vs expert-scaling study (python -m longcat_megatron.study, docs/embedding_study.md)
# over a SLURM job array: array task I trains run I of the spec (spec order, 0-based), then a report
# step aggregates whatever finished:
#
#   n=$(python -m longcat_megatron.study --spec SPEC --list | tail -n +2 | wc -l)
#   jid=$(sbatch --parsable --array=0-$((n-1)) launch/study.sh SPEC)
#   sbatch --dependency=afterany:$jid launch/study.sh SPEC --report-only
#   bash launch/study.sh SPEC               # no SLURM: every run here, one after the other, then the report
#
# Each task is idempotent: a finished run (its result.json) is skipped, an interrupted one resumes
# from its checkpoint, so resubmitting the same array (or only the failed ids: --array=3,7) redoes
# only what is missing. Concurrent tasks build the default tiny corpus once (a file lock).
# Give every run the resources the spec's launch.nproc needs (e.g. sbatch --cpus-per-task=... or
# --gpus-per-node=...); with GPUs set base.parallel.backend / launch.nproc in the spec.
# Extra arguments after SPEC go to python -m longcat_megatron.study (--report-only, --keep-going, ...).
set -euo pipefail

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/longcat_megatron/study/__main__.py" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
[ -f "$_root/longcat_megatron/study/__main__.py" ] || { echo "[study] cannot find the repository: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/tool_env.sh
source "$_root/launch/tool_env.sh"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"

SPEC="${1:-}"
[ -n "$SPEC" ] || { echo "usage: [sbatch --array=0-<n-1>] launch/study.sh SPEC [--report-only ...]" >&2; exit 2; }
shift
cd "$_root"
case " $* " in
    *" --report-only "*) exec "$PYTHON" -m longcat_megatron.study --spec "$SPEC" "$@" ;;
esac
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "[study] array task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname -s): $SPEC"
    exec "$PYTHON" -m longcat_megatron.study --spec "$SPEC" --run-index "$SLURM_ARRAY_TASK_ID" --no-report "$@"
fi
exec "$PYTHON" -m longcat_megatron.study --spec "$SPEC" "$@"
