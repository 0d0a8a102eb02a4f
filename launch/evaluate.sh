#!/usr/bin/env bash
#SBATCH --job-name=longcat-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
#
# Benchmark scores of a run's checkpoints with EleutherAI's lm-evaluation-harness
# (python -m longcat_megatron.evaluate: export to Hugging Face, lm_eval's HF model, scores written to
# RUN_DIR/eval/ and logged to TensorBoard / W&B at each checkpoint's iteration; docs/operations.md,
# "Evaluating checkpoints"). Needs the harness in the job's environment: pip install .[eval].
#
#   RUN_DIR=/shared/ckpt/lite-pretrain TASKS=hellaswag,arc_easy sbatch launch/evaluate.sh
#       # every committed checkpoint of RUN_DIR without scores for TASKS, then exit
#   WATCH=600 RUN_DIR=... TASKS=... sbatch launch/evaluate.sh
#       # next to a training job: every new checkpoint within WATCH seconds of its save, until the
#       # run's last iteration is scored (give the job a time limit >= the training's)
#   RUN_DIR=... TASKS=... sbatch --dependency=afterany:TRAIN_JOB_ID launch/evaluate.sh
#       # after the training job has ended for good (requeues keep it waiting): all its checkpoints
#   ITERATION=20000 RUN_DIR=... TASKS=... bash launch/evaluate.sh    # one checkpoint, on this machine
#
# Operator variables (export them):
RUN_DIR="${RUN_DIR:-}"               # the training run's checkpoint directory (CKPT_DIR / checkpoint.save)
TASKS="${TASKS:-}"                   # lm_eval tasks or groups, comma-separated (lm_eval ls tasks)
ITERATION="${ITERATION:-}"           # one iteration (default: every committed one without scores)
WATCH="${WATCH:-0}"                  # seconds between looks for new checkpoints (0: one pass)
NUM_FEWSHOT="${NUM_FEWSHOT:-}"       # few-shot examples (default: each task's own)
LIMIT="${LIMIT:-}"                   # documents per task (quick checks)
BATCH_SIZE="${BATCH_SIZE:-auto}"
MODEL_ARGS="${MODEL_ARGS:-}"         # extra HF model arguments: parallelize=True spreads a model over the
                                     # node's GPUs (needed when it does not fit one GPU)
INCLUDE_PATH="${INCLUDE_PATH:-}"     # a directory of your own task YAMLs
KEEP_EXPORT="${KEEP_EXPORT:-0}"      # 1: keep RUN_DIR/hf/iter_N after scoring (as big as the weights)
EXTRA_ARGS="${EXTRA_ARGS:-}"         # more longcat_megatron.evaluate arguments (--tokenizer DIR ...)
set -euo pipefail

_root="${LONGCAT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)}"
[ -f "$_root/longcat_megatron/evaluate.py" ] || _root="${SLURM_SUBMIT_DIR:-$PWD}"  # under sbatch: a spool copy
[ -f "$_root/longcat_megatron/evaluate.py" ] || { echo "[evaluate] cannot find the repository: set LONGCAT_ROOT" >&2; exit 2; }
# shellcheck source=launch/tool_env.sh
source "$_root/launch/tool_env.sh"
[ -n "$RUN_DIR" ] && [ -n "$TASKS" ] || { echo "[evaluate] set RUN_DIR and TASKS (see the top of launch/evaluate.sh)" >&2; exit 2; }

args=(--load "$RUN_DIR" --tasks "$TASKS" --batch-size "$BATCH_SIZE")
if [ -n "$ITERATION" ]; then args+=(--iteration "$ITERATION"); else args+=(--pending --watch "$WATCH"); fi
[ -n "$NUM_FEWSHOT" ] && args+=(--num-fewshot "$NUM_FEWSHOT")
[ -n "$LIMIT" ] && args+=(--limit "$LIMIT")
[ -n "$MODEL_ARGS" ] && args+=(--model-args "$MODEL_ARGS")
[ -n "$INCLUDE_PATH" ] && args+=(--include-path "$INCLUDE_PATH")
[ "$KEEP_EXPORT" = 1 ] && args+=(--keep-export)
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
echo "[evaluate] $(date -u +%FT%TZ) ${SLURM_JOB_ID:+job $SLURM_JOB_ID }on $(hostname): python -m longcat_megatron.evaluate ${args[*]} ${extra[*]}"
exec "${PYTHON:-python}" -m longcat_megatron.evaluate "${args[@]}" "${extra[@]}"
