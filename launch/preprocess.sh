#!/usr/bin/env bash
#SBATCH --job-name=longcat-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.log
#
# Tokenize a corpus over a SLURM job array: task I of N tokenizes slice I of the sorted input files
# (a contiguous run of ~n/N files) into OUTPUT_PREFIX.task-IIIII-of-NNNNN.*; a final step checks all N
# and writes OUTPUT_PREFIX.manifest.json, which training takes as data.paths=[OUTPUT_PREFIX.manifest.json]
# (docs/data.md, "Many machines").
#
#   INPUTS='/corpus/web/*.jsonl.gz' TOKENIZER=/tok OUTPUT_PREFIX=/data/web \
#       bash launch/preprocess.sh --submit          # the array (NUM_TASKS tasks) + the manifest job after it
#   sbatch --array=0-63 launch/preprocess.sh        # the array by hand (NUM_TASKS: the array's size)
#   NUM_TASKS=64 FINALIZE=1 sbatch --dependency=afterok:JOBID launch/preprocess.sh   # its manifest job
#   NUM_TASKS=64 bash launch/preprocess.sh --finalize                               # or the same as a command
#   bash launch/preprocess.sh                       # no SLURM: every task here, one after the other, then
#                                                   # the manifest (TASK_INDEX=I: only task I)
#
# Each task writes its files transactionally (nothing of a failed task is visible) and is skipped when
# its output is already complete for the same inputs and settings: after a failure, rerun the same
# array (or only the failed ids: NUM_TASKS=64 sbatch --array=5,17 launch/preprocess.sh) and only the
# failed tasks run again; then finalize. The final step refuses, naming the tasks, until all are done.
# Logs: %x-%A_%a.log in the submission directory (one per array task).
#
# Operator variables (export them):
INPUTS="${INPUTS:-}"                 # input files, globs or directories, space-separated (quote globs)
TOKENIZER="${TOKENIZER:-}"           # local Hugging Face tokenizer directory (tokenizer.json)
OUTPUT_PREFIX="${OUTPUT_PREFIX:-}"   # e.g. /data/web: writes /data/web.task-*, /data/web.manifest.json
NUM_TASKS="${NUM_TASKS:-}"           # tasks sharing the files (default: the array's size; --submit: 1)
WORKERS="${WORKERS:-}"               # tokenizer processes per task (default: the task's CPUs - 1)
JSON_KEY="${JSON_KEY:-text}"         # JSONL key / Parquet column holding the text
MERGE_TASK="${MERGE_TASK:-0}"        # 1: each task merges its files' shards into one dataset
MERGE="${MERGE:-0}"                  # 1: the final step merges everything into OUTPUT_PREFIX.bin/.idx
EXTRA_ARGS="${EXTRA_ARGS:-}"         # more data_tools.preprocess arguments (--text-unit line, --bos ...)
FINALIZE="${FINALIZE:-0}"            # 1: this job is the final step (what --submit's second job runs)
SBATCH_ARGS="${SBATCH_ARGS:-}"       # --submit: extra sbatch arguments for both jobs (--partition=...)
set -euo pipefail

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/data_tools/preprocess.py" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
[ -f "$_root/data_tools/preprocess.py" ] || { echo "[preprocess] cannot find the repository: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/tool_env.sh
source "$_root/launch/tool_env.sh"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mode=run
case "${1:-}" in
    --submit) mode=submit; shift ;;
    --finalize) mode=finalize; shift ;;
esac
[ "$FINALIZE" = 1 ] && mode=finalize
missing=()
for v in INPUTS TOKENIZER OUTPUT_PREFIX; do [ -n "${!v}" ] || missing+=("$v"); done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "[preprocess] set ${missing[*]} (see the top of launch/preprocess.sh)" >&2
    exit 2
fi
set -f  # globs reach the tool unexpanded (it expands them itself, ** included, and sorts the files)
# shellcheck disable=SC2206
inputs=($INPUTS)
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
set +f
common=(--input "${inputs[@]}" --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT_PREFIX" --json-key "$JSON_KEY" "${extra[@]}")

run_task() {  # run_task INDEX COUNT
    local cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    local workers="${WORKERS:-$(( cpus > 1 ? cpus - 1 : 1 ))}"
    local merge=()
    [ "$MERGE_TASK" = 1 ] && merge=(--merge)
    echo "[preprocess] $(date -u +%FT%TZ) task $1 of $2 on $(hostname) (${SLURM_JOB_ID:+job $SLURM_JOB_ID, }$workers workers)"
    "$PYTHON" -m data_tools.preprocess "${common[@]}" --workers "$workers" --task-index "$1" --num-tasks "$2" \
        "${merge[@]}" --quiet
}

finalize() {  # finalize COUNT
    local merge=()
    [ "$MERGE" = 1 ] && merge=(--merge)
    echo "[preprocess] $(date -u +%FT%TZ) final step: checking $1 task(s), writing $OUTPUT_PREFIX.manifest.json"
    "$PYTHON" -m data_tools.preprocess "${common[@]}" --finalize --num-tasks "$1" "${merge[@]}"
}

case "$mode" in
    submit)
        n="${NUM_TASKS:-1}"
        # shellcheck disable=SC2206
        sb=($SBATCH_ARGS)
        script="$_root/launch/preprocess.sh"
        export LONGCAT_ROOT="$_root"  # the jobs run a spool copy of this script: where the code is
        array=$(NUM_TASKS="$n" sbatch --parsable "${sb[@]}" --array="0-$(( n - 1 ))" "$script" "$@")
        array="${array%%;*}"
        final=$(NUM_TASKS="$n" FINALIZE=1 sbatch --parsable "${sb[@]}" --output="%x-%j-finalize.log" \
            --dependency="afterok:$array" --kill-on-invalid-dep=yes "$script" "$@")
        echo "[preprocess] submitted array job $array (tasks 0-$(( n - 1 ))) and final step job ${final%%;*} (after it succeeds)"
        echo "array $array"
        echo "finalize ${final%%;*}"
        ;;
    finalize)
        n="${NUM_TASKS:-}"
        [ -n "$n" ] || { echo "[preprocess] the final step needs NUM_TASKS (the array's size)" >&2; exit 2; }
        finalize "$n"
        ;;
    run)
        if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
            n="${NUM_TASKS:-$(( SLURM_ARRAY_TASK_MAX + 1 ))}"
            run_task "$SLURM_ARRAY_TASK_ID" "$n"
        elif [ -n "${TASK_INDEX:-}" ]; then
            run_task "$TASK_INDEX" "${NUM_TASKS:-1}"
        else
            n="${NUM_TASKS:-1}"
            for (( i = 0; i < n; i++ )); do run_task "$i" "$n"; done
            finalize "$n"
        fi
        ;;
esac
