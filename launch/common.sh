# shellcheck shell=bash
# Launch logic shared by launch/{pretrain,midtrain,sft,local}.sh (sourced, not run).
#
# A stage script sets CONFIG and the array STAGE_OVERRIDES (its recipe as section.field=value), then
# calls `lc_main "$@"`. lc_main
#   * inside an sbatch allocation: runs one srun task per node, each starting torchrun with
#     --node-rank=$SLURM_NODEID, MASTER_ADDR = first host, MASTER_PORT derived from the job id; after
#     the step it requeues the job (scontrol requeue) when training stopped early after saving
#     (exit 75: SIGUSR1/SIGTERM or the exit-duration limit), so the job resumes with no flags changed;
#   * outside SLURM: runs the same job with torchrun on this machine (NPROC_PER_NODE processes) and
#     exits 75 when the run stopped early after saving (run the same command again to resume); a
#     SIGTERM/SIGINT/SIGHUP/SIGUSR1 to this shell (timeout, kill PID, Ctrl-C) is passed on to torchrun
#     once, and the shell waits for the save before it exits 75;
#   * with --dry-run as first argument: validates the config and prints the plan, no training.
# Remaining arguments are config overrides appended last (they win over the recipe).
#
# Environment (all optional; a stage script documents its own recipe variables):
#   LONGCAT_ROOT     repository root (default: found from this file, or $SLURM_SUBMIT_DIR)
#   LONGCAT_VENV     virtualenv to use when none is active (default: $LONGCAT_ROOT/.venv)
#   LONGCAT_CPU=1    CPU test mode: gloo backend, no CUDA, NPROC_PER_NODE default 2, OMP threads 1;
#                    without it the job runs with parallel.backend=nccl and needs a usable CUDA GPU
#   NPROC_PER_NODE   processes per node (default: GPUs of the allocation / visible GPUs, else 8; CPU: 2)
#   MARKER_DIR       where ranks leave the "exit 75: requeue me" marker for the batch shell; must be
#                    visible from the first node (default: the stage's checkpoint directory, which a
#                    multi-node job has on shared storage anyway; else /tmp)
#   MAX_REQUEUES     stop requeueing after this many restarts (default 100)
#   MAX_CRASH_REQUEUES  requeue a crashed or hung run (exit not 0/2/75/77/78) at most this many times
#                    per job (default 3; 0 = never); a failure identical to the previous one (same reason,
#                    same iteration) is never requeued. History: CKPT_DIR/.longcat-failures
#   MAX_SDC_REQUEUES requeue a run that detected silent data corruption (exit 78: a step computed
#                    differently when replayed) at most this many times per job (default 3; 0 = never),
#                    each time excluding the suspect node(s) (ExcNodeList). History:
#                    CKPT_DIR/.longcat-sdc-requeues
#   EXIT_DURATION_MINS  stop (saving) this many minutes after the job started; "auto" (default) =
#                    the job's time limit minus STOP_MARGIN_MINS (default 15: one step + one save +
#                    exit), 0 = off. The clock starts at SLURM's StartTime of this run
#                    (LONGCAT_JOB_START_TIME), so start-up counts against it
#   HANG_TIMEOUT_MINS   train.hang_timeout_mins for launched jobs (default 20, 0 = off): a rank on
#                    which no step completes for that long dumps its Python stacks to LONGCAT_LOG_DIR
#                    (default: CKPT_DIR/logs) and exits 76, and the job is requeued
#   SAVE_GRACE_S     torchrun's shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): seconds it lets
#                    ranks finish after a forwarded signal or a failed rank before SIGKILL (default
#                    300). Under SLURM torchrun does not handle SIGUSR1 at all (the ranks get it from
#                    SLURM directly), so no launcher countdown runs during a preemption save
#   MASTER_PORT      rendezvous port (default: 20000 + job id % 20000)
#   EXTRA_LAUNCHER_ARGS  extra torchrun arguments (e.g. "--log-dir /tmp/tr")
#   LONGCAT_LOG_DIR  per-rank log files and events.log (default: $CKPT_DIR/logs; see launch/rank.sh)

lc_die() { echo "[launch] error: $*" >&2; exit 2; }
lc_log() { echo "[launch] $*"; }

# --- locate the repository and the python environment ----------------------------------------------
lc_find_root() {
    if [ -n "${LONGCAT_ROOT:-}" ]; then :
    elif [ -f "$(dirname "${BASH_SOURCE[0]}")/common.sh" ] && [ -f "$(dirname "${BASH_SOURCE[0]}")/../longcat_megatron/train.py" ]; then
        LONGCAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    else
        LONGCAT_ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
    fi
    [ -f "$LONGCAT_ROOT/longcat_megatron/train.py" ] || lc_die "cannot find the repository at '$LONGCAT_ROOT': \
submit from the repository root or set LONGCAT_ROOT"
    export LONGCAT_ROOT
}

lc_setup_env() {
    lc_find_root
    LONGCAT_VENV="${LONGCAT_VENV:-$LONGCAT_ROOT/.venv}"
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$LONGCAT_VENV/bin/python" ]; then
        export VIRTUAL_ENV="$LONGCAT_VENV" PATH="$LONGCAT_VENV/bin:$PATH"
    fi
    PYTHON="${PYTHON:-python}"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$LONGCAT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"
    if [ "${LONGCAT_CPU:-0}" = 1 ]; then
        export LONGCAT_FORCE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""
        NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
        LC_BACKEND_OVERRIDE=(parallel.backend=gloo)
    else
        # CUDA/NCCL defaults (an exported value wins).
        export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron TP/SP overlap ordering
        export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail, don't hang
        export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
        export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-19}"
        export NCCL_IB_SL="${NCCL_IB_SL:-1}"
        export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
        export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache_${USER:-user}}"
        if [ -z "${NPROC_PER_NODE:-}" ]; then
            NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-}"
            [ -n "$NPROC_PER_NODE" ] || NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
            [ "${NPROC_PER_NODE:-0}" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=8
        fi
        # GPU mode says so: without a usable CUDA (a CPU-only torch wheel, a broken driver) the ranks
        # stop at start-up with the cause and the fix (exit 2) instead of training on the CPU for hours.
        LC_BACKEND_OVERRIDE=(parallel.backend=nccl)
    fi
    # torchrun: forward SIGUSR1 (SLURM's pre-timeout warning) too, and give ranks time to save.
    export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
    # torch >= 2.7's torchrun overwrites that variable with its --signals-to-handle default (which
    # lacks SIGUSR1: it would kill torchrun and orphan the ranks), so pass the flag where it exists.
    LC_TORCHRUN_SIGNAL_ARGS=""
    if grep -q signals_to_handle "$("$PYTHON" -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("torch").origin), "distributed", "run.py"))' 2>/dev/null)" 2>/dev/null; then
        LC_TORCHRUN_SIGNAL_ARGS="--signals-to-handle=$TORCHELASTIC_SIGNALS_TO_HANDLE"
    fi
    export LC_TORCHRUN_SIGNAL_ARGS
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SAVE_GRACE_S:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}}"
}

# --- small helpers used by the stage scripts --------------------------------------------------------
# lc_set FIELD VALUE: append FIELD=VALUE to STAGE_OVERRIDES when VALUE is not empty (empty = keep the
# config file's value).
lc_set() { [ -n "$2" ] && STAGE_OVERRIDES+=("$1=$2"); return 0; }

# The parallel layout variables shared by all stages (empty = the config's value).
lc_set_parallel() {
    lc_set parallel.tensor "${TP:-}"; lc_set parallel.pipeline "${PP:-}"
    lc_set parallel.virtual_pipeline "${VPP:-}"; lc_set parallel.context "${CP:-}"
    lc_set parallel.expert "${EP:-}"; lc_set parallel.sequence_parallel "${SEQUENCE_PARALLEL:-}"
}

# Iteration of the last committed checkpoint in $1 (empty when none).
lc_committed_iteration() {
    local f="$1/latest_checkpointed_iteration.txt"
    [ -s "$f" ] && tr -d '[:space:]' < "$f"
}

# Overrides that make a stage start from a previous stage's checkpoint ($2) unless its own directory
# ($1) already holds one (then it resumes itself: requeues and resubmissions continue this stage; the
# trainer applies the same rule, checkpoint.save before checkpoint.load). Either way the stage has its
# own iteration counter (from 0), LR schedule and data position:
#   $3 = 1: weights only, fresh Adam state (checkpoint.finetune=true)
#   $3 = 0: weights and the previous stage's Adam state (checkpoint.reset_schedule=true)
lc_init_from() {
    local own="$1" from="$2" fresh="$3"
    if [ -n "$(lc_committed_iteration "$own")" ]; then
        return 0
    fi
    [ -n "$(lc_committed_iteration "$from")" ] || lc_die "no committed checkpoint in '$from' \
(the previous stage's checkpoint directory): set INIT_FROM to it"
    echo "checkpoint.load=$from"
    if [ "$fresh" = 1 ]; then
        echo "checkpoint.finetune=true"
    else
        echo "checkpoint.reset_schedule=true"
    fi
}

# Model growth of a stage (GROW_FROM, GROW_FACTOR, GROW_ORDER, GROW_DIR): launch/grow.sh
# shellcheck source=launch/grow.sh
source "$(dirname "${BASH_SOURCE[0]}")/grow.sh"

# Minutes in a SLURM duration (D-HH:MM:SS, HH:MM:SS or MM:SS); empty if unlimited/unknown.
lc_slurm_minutes() {
    local left="$1" d=0 h=0 m=0 s=0
    case "$left" in ""|UNLIMITED|NOT_SET|INVALID|Partition_Limit) return 0 ;; esac
    if [[ "$left" == *-* ]]; then d="${left%%-*}"; left="${left#*-}"; fi
    IFS=: read -r -a parts <<< "$left"
    case "${#parts[@]}" in
        3) h="${parts[0]}"; m="${parts[1]}"; s="${parts[2]}" ;;
        2) m="${parts[0]}"; s="${parts[1]}" ;;
        1) s="${parts[0]}" ;;
    esac
    echo $(( 10#$d * 1440 + 10#$h * 60 + 10#$m ))
}

# The job's time limit in minutes (squeue %l); empty if unlimited/unknown.
lc_time_limit_minutes() {
    lc_slurm_minutes "$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null | head -n1)"
}

# Epoch seconds at which this run of the job started: SLURM_JOB_START_TIME (Slurm >= 23.02), else
# scontrol's StartTime (the restart's start after a requeue), else now.
lc_job_start_time() {
    local t
    if [ -n "${SLURM_JOB_START_TIME:-}" ]; then echo "$SLURM_JOB_START_TIME"; return 0; fi
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        t="$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StartTime=[^ ]*' | cut -d= -f2)"
        t="$(date -d "$t" +%s 2>/dev/null)" && [ -n "$t" ] && { echo "$t"; return 0; }
    fi
    date +%s
}

# train.exit_duration_mins, measured by the trainer from LONGCAT_JOB_START_TIME (the job's start, not
# the trainer's): the time limit minus STOP_MARGIN_MINS, so start-up, the last step and the save fit.
lc_exit_duration_override() {
    local want="${EXIT_DURATION_MINS:-auto}" limit
    if [ "$want" = auto ]; then
        [ -n "${SLURM_JOB_ID:-}" ] || return 0
        limit="$(lc_time_limit_minutes)"
        [ -n "$limit" ] || return 0
        want=$(( limit - ${STOP_MARGIN_MINS:-15} ))
        if [ "$want" -le 0 ]; then
            echo "[launch] warning: time limit ${limit} min <= STOP_MARGIN_MINS=${STOP_MARGIN_MINS:-15}: no exit-duration stop" >&2
            return 0
        fi
    fi
    [ "$want" != 0 ] && echo "train.exit_duration_mins=$want"
    return 0
}

# Record a crashed/hung run in HISTORY and decide whether to requeue it (return 0) or not (1).
#   $1 HISTORY file (kept across requeues), $2 job id, $3 failure signature ("iteration N: reason").
# Not requeued: MAX_CRASH_REQUEUES (default 3) crashes of this job already requeued, or the same
# signature as this job's previous failure (a deterministic failure: requeueing would repeat it).
lc_crash_decision() {
    local history="$1" job="$2" sig="$3" max="${MAX_CRASH_REQUEUES:-3}" count previous
    count="$(grep -c "^$job " "$history" 2>/dev/null)"; count="${count:-0}"
    previous="$(grep "^$job " "$history" 2>/dev/null | tail -n1 | cut -d' ' -f2-)"
    echo "$job $sig" >> "$history"
    if [ "$previous" = "$sig" ]; then
        lc_log "the same failure as this job's previous run ($sig): not requeueing (a repeatable \
failure; fix the cause and resubmit; it resumes from the last committed checkpoint)"
        return 1
    fi
    if [ "$count" -ge "$max" ]; then
        lc_log "job $job already failed $count time(s) (MAX_CRASH_REQUEUES=$max): not requeueing"
        return 1
    fi
    lc_log "requeueing after failure $(( count + 1 )) of at most $max (MAX_CRASH_REQUEUES)"
    return 0
}

# Exit 77 (training/stability.py): too many non-finite / loss-spike steps. Requeueing would only
# repeat them: an operator must act. $1: the ranks' exit codes file; true (and says so) if a rank exited 77.
lc_stopped_for_instability() {
    grep -qx 77 "$1" 2>/dev/null || return 1
    lc_log "training stopped for instability (exit 77: too many non-finite or loss-spike steps; the job \
log's [stability] lines name the iterations, data positions and the last good checkpoint): not requeueing \
(docs/operations.md, \"Loss spikes, non-finite steps and router stability\")"
}

# Exit 78 (the trainer's EXIT_SDC): silent data corruption, a step that a faulty GPU computed wrongly.
# Every rank exits 78; the ranks append one line per suspect rank to $LONGCAT_SDC_FILE:
# ITERATION<TAB>RANK<TAB>HOSTNAME<TAB>DESCRIPTION (HOSTNAME as `hostname -s`, which is taken to be the
# SLURM node name). $1: the ranks' exit codes file, $2: that SDC file. True (and logs the suspects) if a
# rank exited 78; sets LC_SDC_HOSTS to the suspect hosts (comma-separated, empty when none recorded).
LC_SDC_HOSTS=""
lc_stopped_for_sdc() {
    grep -qx 78 "$1" 2>/dev/null || return 1
    LC_SDC_HOSTS="$(cut -f3 "$2" 2>/dev/null | lc_merge_hostlist)"
    lc_log "silent data corruption detected (exit 78: a step computed differently when replayed; \
sdc.jsonl in the run directory has the details)"
    local it rank host desc
    while IFS=$'\t' read -r it rank host desc; do
        lc_log "  suspect: rank $rank on host $host at iteration $it: $desc"
    done < <(cat "$2" 2>/dev/null)
    if [ -n "$LC_SDC_HOSTS" ]; then
        lc_log "suspect host(s): $LC_SDC_HOSTS"
    else
        lc_log "no suspect host was recorded (${2:-LONGCAT_SDC_FILE} is empty)"
    fi
}

# Host names (comma-separated lists as arguments, and/or one per line on stdin when no argument is
# given) merged into one comma-separated list, each host once, in order. SLURM's "(null)" is empty.
# Under SLURM hostlist expressions (node[01-03]) are expanded by `scontrol show hostnames`.
lc_merge_hostlist() {
    local lists
    if [ "$#" -gt 0 ]; then lists="$(printf '%s,' "$@")"; else lists="$(tr '\n' ,)"; fi
    lists="$(echo "$lists" | sed -e 's/(null)//g' -e 's/,,*/,/g' -e 's/^,//' -e 's/,$//')"
    [ -n "$lists" ] || return 0
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$lists" 2>/dev/null || echo "$lists" | tr , '\n'
    else
        echo "$lists" | tr , '\n'
    fi | awk 'NF && !seen[$0]++' | paste -sd, -
}

# Record an SDC requeue of job $2 (restart $3) in HISTORY $1 (one line per requeue: job, restart,
# iteration(s), suspect hosts) and decide whether to requeue (return 0) or not (1: this job already
# had MAX_SDC_REQUEUES of them: corruption that follows the job from node to node is more likely a
# bug than a faulty GPU). $4: the SDC file (for the iterations). Uses LC_SDC_HOSTS (lc_stopped_for_sdc).
lc_sdc_decision() {
    local history="$1" job="$2" restart="$3" max="${MAX_SDC_REQUEUES:-3}" count its
    count="$(grep -c "^$job " "$history" 2>/dev/null)"; count="${count:-0}"
    if [ "$count" -ge "$max" ]; then
        lc_log "job $job already had $count silent-data-corruption requeue(s) (MAX_SDC_REQUEUES=$max): \
not requeueing (exit 78; history in $history)"
        return 1
    fi
    its="$(cut -f1 "$4" 2>/dev/null | awk 'NF && !seen[$0]++' | paste -sd, -)"
    echo "$job $restart ${its:--} ${LC_SDC_HOSTS:--}" >> "$history"
    if [ -n "$LC_SDC_HOSTS" ]; then
        lc_log "requeueing after silent data corruption $(( count + 1 )) of at most $max (MAX_SDC_REQUEUES), \
excluding suspect host(s) $LC_SDC_HOSTS"
    else
        lc_log "requeueing after silent data corruption $(( count + 1 )) of at most $max (MAX_SDC_REQUEUES) \
without excluding any node (no suspect host recorded)"
    fi
    return 0
}

# Requeue this job (from its batch script) so that it never runs on HOSTS ($1, comma-separated) again;
# exits 0 on success, returns 1 when `scontrol requeuehold` failed (the caller then requeues plainly).
# Why this sequence (established on the test cluster's SLURM): `scontrol update ExcNodeList=` is refused
# for a RUNNING job ("Job is no longer pending execution"), so the job is first requeued held, then
# updated while PENDING (COMPLETING), then released. requeuehold SIGTERMs this batch script ("CANCELLED
# DUE TO JOB REQUEUE"): with TERM ignored it survives until KillWait (often 30 s; 10 s on the test
# cluster) ends, enough for the update and the release. The current ExcNodeList is read (and merged)
# beforehand so that only the two scontrol calls fall into that window.
lc_requeue_excluding() {
    local current merged
    current="$(scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2-)"
    merged="$(lc_merge_hostlist "$current" "$1")"
    trap '' TERM
    if ! scontrol requeuehold "$SLURM_JOB_ID"; then
        lc_log "scontrol requeuehold failed: requeueing without excluding $1"
        trap - TERM
        return 1
    fi
    if scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$merged"; then
        lc_log "job $SLURM_JOB_ID requeued excluding node(s) $merged (ExcNodeList)"
    else
        lc_log "scontrol update ExcNodeList=$merged failed: the job is requeued WITHOUT excluding $1"
    fi
    scontrol release "$SLURM_JOB_ID" || lc_log "scontrol release failed: the job stays held; \
release it by hand (scontrol release $SLURM_JOB_ID)"
    exit 0
}

# The failure signature of a run from the ranks' records (training/faults.py) and exit codes.
lc_failure_signature() {
    local records="$1" codes="$2" rc="$3" first
    first="$(head -n1 "$records" 2>/dev/null)"
    if [ -n "$first" ]; then
        echo "iteration ${first%%$'\t'*}: ${first#*$'\t'}"
    else
        echo "exit ${rc}$( [ -s "$codes" ] && printf ' (rank exits %s)' "$(sort -u "$codes" | tr '\n' ' ' | sed 's/ $//')" ) after checkpoint ${LC_COMMITTED_AT_START:-none}"
    fi
}

# --- the job -------------------------------------------------------------------------------------------
lc_train_cmd() {  # the per-rank command (after torchrun)
    LC_TRAIN=("$LONGCAT_ROOT/launch/rank.sh" "$PYTHON" -m longcat_megatron.train --config "$CONFIG" ${STAGE_FILE:+--stage "$STAGE_FILE"}
              "${STAGE_OVERRIDES[@]}" "${LC_BACKEND_OVERRIDE[@]}" "${LC_RUNTIME_OVERRIDES[@]}" "$@")
}

lc_main() {
    lc_setup_env
    export LONGCAT_RUN_DIR="${LONGCAT_RUN_DIR:-${LC_CKPT_DIR:-}}"  # per-rank logs + events (rank.sh)
    cd "$LONGCAT_ROOT" || lc_die "cannot cd to $LONGCAT_ROOT"
    [ -n "${CONFIG:-}" ] || lc_die "CONFIG is not set"
    [ -f "$CONFIG" ] || lc_die "config file '$CONFIG' does not exist (set CONFIG=...)"
    [ -n "${GROW_FROM:-}" ] && lc_grow_stage "${1:-}"
    if [ "${1:-}" = --dry-run ]; then
        shift
        local nodes="${SLURM_JOB_NUM_NODES:-${NNODES:-1}}"
        exec "$PYTHON" -m longcat_megatron.train --config "$CONFIG" ${STAGE_FILE:+--stage "$STAGE_FILE"} --dry-run \
            --world-size $(( nodes * NPROC_PER_NODE )) "${STAGE_OVERRIDES[@]}" "${LC_BACKEND_OVERRIDE[@]}" "$@"
    fi
    local where=local
    [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${LONGCAT_NO_SLURM:-}" ] && where=slurm
    # Locally this shell is what timeout, kill PID and Ctrl-C signal: from here on it passes a stop on
    # to torchrun and waits (lc_run_local); under SLURM the batch shell has its own traps (lc_run_slurm).
    [ "$where" = local ] && lc_trap_local_signals
    if ! lc_preflight "$@"; then
        [ -n "$LC_LOCAL_STOP" ] && lc_stopped_before_start
        exit 2
    fi
    LC_RUNTIME_OVERRIDES=()
    export LONGCAT_JOB_START_TIME; LONGCAT_JOB_START_TIME="$(lc_job_start_time)"
    local dur; dur="$(lc_exit_duration_override)"
    [ -n "$dur" ] && LC_RUNTIME_OVERRIDES+=("$dur")
    [ "${HANG_TIMEOUT_MINS:-20}" != 0 ] && LC_RUNTIME_OVERRIDES+=("train.hang_timeout_mins=${HANG_TIMEOUT_MINS:-20}")
    [ -n "${LC_CKPT_DIR:-}" ] && export LONGCAT_LOG_DIR="${LONGCAT_LOG_DIR:-$LC_CKPT_DIR/logs}"
    if [ "$where" = slurm ]; then
        lc_run_slurm "$@"
    else
        lc_run_local "$@"
    fi
}

# Validate the config for the world size once, before starting any rank (a bad config is exit 2 here
# instead of N tracebacks and torchrun's generic exit 1), and print the plan into the log.
lc_preflight() {
    [ "${LONGCAT_SKIP_PREFLIGHT:-0}" = 1 ] && return 0
    local nodes="${SLURM_JOB_NUM_NODES:-1}"
    [ -n "${LONGCAT_NO_SLURM:-}" ] && nodes=1
    "$PYTHON" -W ignore -m longcat_megatron.train --config "$CONFIG" ${STAGE_FILE:+--stage "$STAGE_FILE"} --dry-run \
        --world-size $(( nodes * NPROC_PER_NODE )) "${STAGE_OVERRIDES[@]}" "${LC_BACKEND_OVERRIDE[@]}" "$@" \
        2>&1 | grep -v -i -E "warn|^\s*$" >&2
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || echo "[launch] the config check failed (exit $rc): nothing was started" >&2
    return "$rc"
}

# --- a run on this machine -------------------------------------------------------------------------
# The wrapper (local.sh, or a stage script outside SLURM) is the process that `timeout`, `kill PID` and
# Ctrl-C signal. Bash's default is to die at once and leave torchrun and the ranks running without it
# (the exit code 75 lost, `timeout` returning while they still save), so it traps the stop signals,
# passes the first one on to torchrun (which forwards it to the ranks: they save and exit 75) and waits.
# torchrun runs in a process group of its own, so only this shell signals it, exactly once: a signal to
# the whole group (timeout's, the terminal's) would otherwise reach it twice, and torchrun restarts its
# shutdown on a second signal and gives up on a third, leaving the ranks running.
LC_LOCAL_STOP=""        # the first stop signal this shell received (TERM, INT, HUP, QUIT, USR1)
LC_LOCAL_PID=""         # torchrun, once started
LC_LOCAL_FORWARDED=""
lc_trap_local_signals() {
    local s
    for s in TERM INT HUP QUIT USR1; do
        # shellcheck disable=SC2064
        trap "lc_on_local_signal $s" "$s"
    done
}

lc_on_local_signal() {
    if [ -n "$LC_LOCAL_STOP" ]; then
        lc_log "SIG$1 received again: already stopping (SIG$LC_LOCAL_STOP), waiting for the ranks to \
save and exit${LC_LOCAL_PID:+ (torchrun pid $LC_LOCAL_PID; kill -KILL it and its ranks to abandon the save)}"
        return 0
    fi
    LC_LOCAL_STOP="$1"
    [ -n "$LC_LOCAL_PID" ] || lc_log "received SIG$1 before training started"
    lc_forward_local_stop
}

lc_forward_local_stop() {  # once, as soon as both a stop signal and torchrun exist
    [ -n "$LC_LOCAL_STOP" ] && [ -n "$LC_LOCAL_PID" ] && [ -z "$LC_LOCAL_FORWARDED" ] || return 0
    LC_LOCAL_FORWARDED=1
    local sig="$LC_LOCAL_STOP"
    # The ranks save on TERM, INT and USR1; SIGHUP (terminal closed) would kill them unsaved. SIGQUIT
    # (Ctrl-\) stays a quit: the ranks die without saving.
    [ "$sig" = HUP ] && sig=TERM
    lc_log "received SIG$LC_LOCAL_STOP: passing SIG$sig to torchrun (pid $LC_LOCAL_PID); the ranks save a \
checkpoint and exit, then this script exits 75"
    kill -s "$sig" "$LC_LOCAL_PID" 2>/dev/null || true
}

lc_stopped_before_start() {
    lc_log "stopped by SIG$LC_LOCAL_STOP before training started (nothing was started): run the same \
command again"
    exit 75
}

lc_run_local() {
    local marker codes sdc
    marker="$(mktemp -u "${TMPDIR:-/tmp}/longcat-requeue.XXXXXX")"
    codes="$(mktemp -u "${TMPDIR:-/tmp}/longcat-exits.XXXXXX")"
    sdc="$(mktemp -u "${TMPDIR:-/tmp}/longcat-sdc.XXXXXX")"
    lc_train_cmd "$@"
    [ -n "$LC_LOCAL_STOP" ] && lc_stopped_before_start
    lc_log "torchrun on this machine: $NPROC_PER_NODE processes, config $CONFIG"
    set -m   # job control for this one job only: torchrun gets a process group of its own (see above)
    LONGCAT_REQUEUE_MARKER="$marker" LONGCAT_EXIT_CODES="$codes" LONGCAT_SDC_FILE="$sdc" \
        "$PYTHON" -m torch.distributed.run --standalone \
        --nproc-per-node="$NPROC_PER_NODE" $LC_TORCHRUN_SIGNAL_ARGS ${EXTRA_LAUNCHER_ARGS:-} --no-python "${LC_TRAIN[@]}" &
    LC_LOCAL_PID=$!
    set +m
    lc_forward_local_stop   # a signal that arrived while torchrun was being started
    local rc
    while :; do   # a trapped signal interrupts `wait` (status > 128); torchrun is still running then
        wait "$LC_LOCAL_PID"; rc=$?
        [ "$rc" -gt 128 ] || break
        kill -0 "$LC_LOCAL_PID" 2>/dev/null && continue
        wait "$LC_LOCAL_PID" 2>/dev/null   # it ended meanwhile: its status, if not yet collected
        local again=$?; [ "$again" != 127 ] && rc=$again
        break
    done
    local rank_codes; rank_codes="$(sort -u "$codes" 2>/dev/null | tr '\n' ' ')"
    if lc_stopped_for_instability "$codes"; then rm -f "$codes" "$marker" "$sdc"; return 77; fi
    if lc_stopped_for_sdc "$codes" "$sdc"; then   # no requeue loop here: the same GPU would run it again
        lc_log "not rerunning (exit 78): on a SLURM cluster the job would be requeued without the suspect \
node(s)${LC_SDC_HOSTS:+ ($LC_SDC_HOSTS)}; here, check or avoid the suspect GPU(s) before running again"
        rm -f "$codes" "$marker" "$sdc"; return 78
    fi
    rm -f "$codes" "$sdc"
    if [ -e "$marker" ]; then
        rm -f "$marker"
        lc_log "training stopped early after saving a checkpoint; run the same command again to resume"
        return 75
    fi
    if [ -n "$LC_LOCAL_STOP" ] && [ "$rc" != 0 ] && [[ " $rank_codes" != *" 2 "* ]]; then
        # e.g. the signal came while the ranks were still starting (before their handler was in place)
        local it; it="$(lc_committed_iteration "${LC_CKPT_DIR:-/nonexistent}")"
        lc_log "training ended with exit $rc after SIG$LC_LOCAL_STOP without saving; run the same command \
again to resume from the last committed checkpoint${it:+ (iteration $it)}"
        return 75
    fi
    return "$rc"
}

LC_STOP_SIGNAL=""
lc_on_signal() {  # the batch shell got the pre-timeout warning (--signal=B:USR1@...) or SIGTERM
    LC_STOP_SIGNAL="$1"
    lc_log "batch shell received SIG$1: asking the training processes to save and stop"
    if [ "$1" = USR1 ]; then
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true   # job steps only, not this shell
    fi
}

lc_run_slurm() {
    local nnodes="${SLURM_JOB_NUM_NODES:-1}" restart="${SLURM_RESTART_COUNT:-0}"
    export MASTER_ADDR; MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    export MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
    # Shared storage: with --kill-on-bad-exit the first node to finish may get the others killed
    # before their ranks leave a marker, so every node writes the same file.
    local marker_dir="${MARKER_DIR:-${LC_CKPT_DIR:-${TMPDIR:-/tmp}}}"
    mkdir -p "$marker_dir"
    export LONGCAT_REQUEUE_MARKER="$marker_dir/.longcat-requeue-$SLURM_JOB_ID-$restart"
    # rank.sh appends each rank's non-zero exit code; training/faults.py each rank's failure reason
    export LONGCAT_EXIT_CODES="$marker_dir/.longcat-exits-$SLURM_JOB_ID-$restart"
    export LONGCAT_FAILURE_FILE="$marker_dir/.longcat-failure-$SLURM_JOB_ID-$restart"
    # ... and the suspect ranks of a silent data corruption (exit 78; lc_stopped_for_sdc)
    export LONGCAT_SDC_FILE="$marker_dir/.longcat-sdc-$SLURM_JOB_ID-$restart"
    rm -f "$LONGCAT_REQUEUE_MARKER" "$LONGCAT_EXIT_CODES" "$LONGCAT_FAILURE_FILE" "$LONGCAT_SDC_FILE"
    LC_COMMITTED_AT_START="$(lc_committed_iteration "${LC_CKPT_DIR:-/nonexistent}")"
    # The ranks get SIGUSR1 from SLURM directly (scancel --signal=USR1 reaches every process of the
    # step): torchrun keeps ignoring it, so no launcher shutdown countdown (30 s in older torchrun
    # builds, whatever TORCH_ELASTIC_SHUTDOWN_TIMEOUT says) can kill a rank in the middle of its save.
    export TORCHELASTIC_SIGNALS_TO_HANDLE="${LC_SLURM_TORCHRUN_SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT}"
    if [ -n "$LC_TORCHRUN_SIGNAL_ARGS" ]; then   # the flag must say the same, or torchrun handles SIGUSR1
        export LC_TORCHRUN_SIGNAL_ARGS="--signals-to-handle=$TORCHELASTIC_SIGNALS_TO_HANDLE"
    fi
    lc_train_cmd "$@"
    lc_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart $restart: $nnodes node(s) x $NPROC_PER_NODE \
processes, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, $(date -Is)"
    lc_log "command: ${LC_TRAIN[*]:1}"
    lc_log "this run started $(date -d "@$LONGCAT_JOB_START_TIME" -Is 2>/dev/null || echo "$LONGCAT_JOB_START_TIME") \
(LONGCAT_JOB_START_TIME: the origin of train.exit_duration_mins)"
    trap 'lc_on_signal USR1' USR1
    trap 'lc_on_signal TERM' TERM
    # One task per node; it becomes torchrun with this node's rank. --cpus-per-task: since Slurm 22.05
    # srun does not inherit it from sbatch, and a one-task step would otherwise be bound to one core.
    # SLURM signals every process of the step: torchrun starts with SIGUSR1 ignored (an early warning
    # must not kill it) and installs its forwarding handler (TORCHELASTIC_SIGNALS_TO_HANDLE) later.
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --export=ALL \
        bash -c 'trap "" USR1; exec "$0" -m torch.distributed.run --nnodes="$1" --nproc-per-node="$2" \
                 --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
                 $LC_TORCHRUN_SIGNAL_ARGS ${EXTRA_LAUNCHER_ARGS:-} --no-python "${@:3}"' \
        "$PYTHON" "$nnodes" "$NPROC_PER_NODE" "${LC_TRAIN[@]}" &
    local srun_pid=$! rc
    while :; do   # a trapped signal interrupts `wait`; keep waiting until srun has really exited
        wait "$srun_pid"; rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1 TERM
    local requeue=0 hung=0
    grep -qx 76 "$LONGCAT_EXIT_CODES" 2>/dev/null && hung=1
    if [ "$rc" = 0 ]; then
        lc_log "training finished (job $SLURM_JOB_ID restart $restart)"
    elif [ "$LC_STOP_SIGNAL" = TERM ]; then
        # scancel, the time limit or preemption: SLURM decides what happens to the job, not us
        lc_log "job is being terminated by SLURM (SIGTERM; exit $rc): not requeueing"
    elif [ -e "$LONGCAT_REQUEUE_MARKER" ] || [ "$rc" = 75 ]; then
        lc_log "training saved a checkpoint and stopped early (exit 75)"; requeue=1
    elif lc_stopped_for_sdc "$LONGCAT_EXIT_CODES" "$LONGCAT_SDC_FILE"; then
        if lc_sdc_decision "${LC_CKPT_DIR:-$marker_dir}/.longcat-sdc-requeues" "$SLURM_JOB_ID" "$restart" \
                "$LONGCAT_SDC_FILE"; then
            requeue=1
        else
            rc=78
        fi
    elif [ -n "$LC_STOP_SIGNAL" ]; then
        lc_log "training ended with exit $rc after SIG$LC_STOP_SIGNAL; the last committed checkpoint will be resumed"
        requeue=1
    elif lc_stopped_for_instability "$LONGCAT_EXIT_CODES"; then
        rc=77
    elif grep -qx 2 "$LONGCAT_EXIT_CODES" 2>/dev/null; then
        lc_log "training stopped on a bad input (exit 2, message above): not requeueing"
    else
        local sig; sig="$(lc_failure_signature "$LONGCAT_FAILURE_FILE" "$LONGCAT_EXIT_CODES" "$rc")"
        if [ "$hung" = 1 ]; then
            lc_log "training hung (watchdog exit 76; Python stacks in ${LONGCAT_LOG_DIR:-CKPT_DIR/logs}/hang-stacks-rank*.txt): $sig"
        else
            lc_log "training crashed (exit $rc): $sig"
        fi
        if lc_crash_decision "${LC_CKPT_DIR:-$marker_dir}/.longcat-failures" "$SLURM_JOB_ID" "$sig"; then
            requeue=1
        else
            lc_log "not requeueing: resubmit to resume from the last committed checkpoint"
        fi
    fi
    rm -f "$LONGCAT_REQUEUE_MARKER" "$LONGCAT_EXIT_CODES" "$LONGCAT_FAILURE_FILE" "$LONGCAT_SDC_FILE"
    if [ "$requeue" = 1 ]; then
        if [ "$restart" -ge "${MAX_REQUEUES:-100}" ]; then
            lc_log "restart $restart reached MAX_REQUEUES=${MAX_REQUEUES:-100}: not requeueing"
            exit 75
        fi
        lc_log "requeueing job $SLURM_JOB_ID (it resumes from its latest checkpoint)"
        # after a silent data corruption: without the suspect node(s) (exits, unless requeuehold failed)
        [ -n "$LC_SDC_HOSTS" ] && lc_requeue_excluding "$LC_SDC_HOSTS"
        scontrol requeue "$SLURM_JOB_ID" || { lc_log "scontrol requeue failed"; exit 75; }
        exit 0
    fi
    exit "$rc"
}
