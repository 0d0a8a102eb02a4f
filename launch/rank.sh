#!/usr/bin/env bash
# One training rank. torchrun starts it with --no-python, one per local GPU/process:
#     rank.sh python -m longcat_megatron.train --config CONFIG [overrides...]
# It runs the command and, when the command exits with 75 ("saved a checkpoint and stopped early:
# requeue me"), creates the file $LONGCAT_REQUEUE_MARKER; any other non-zero code is appended to
# $LONGCAT_EXIT_CODES. torchrun itself reports any failed worker
# as exit 1, so this marker is how launch/common.sh learns that the job must be requeued.
#
# Signals: SLURM delivers SIGUSR1/SIGTERM to every process of the job step, and torchrun forwards
# them to the rank's process group as well; the python process handles both (save, then exit 75).
# This shell must outlive python to write the marker: it ignores SIGUSR1 (python installs its own
# handler over the inherited "ignore") and defers SIGTERM/SIGINT until python has exited.
#
# Logs: with LONGCAT_RUN_DIR set (launch/common.sh sets it to the stage's checkpoint directory),
# rank 0 keeps the job log (stdout/stderr) and every other rank appends to its own file
# $LONGCAT_LOG_DIR/rank-NNNNN.log (default LONGCAT_LOG_DIR=$LONGCAT_RUN_DIR/logs; shared storage
# for multi-node jobs); rank 0 also appends one line per start and exit to events.log there, which
# `python -m longcat_megatron.status RUN_DIR` reads (requeues, failures). LONGCAT_RANK_LOGS=0 keeps
# every rank on the job log (torchrun interleaves them).
trap '' USR1
trap ':' TERM INT
rank="${RANK:-0}"
log_dir=""
if [ -n "${LONGCAT_RUN_DIR:-}" ] && [ "${LONGCAT_RANK_LOGS:-1}" = 1 ]; then
    log_dir="${LONGCAT_LOG_DIR:-$LONGCAT_RUN_DIR/logs}"
    mkdir -p "$log_dir" 2>/dev/null || log_dir=""
fi
job="job=${SLURM_JOB_ID:-local} restart=${SLURM_RESTART_COUNT:-0} host=$(hostname -s 2>/dev/null || echo ?)"
if [ -n "$log_dir" ] && [ "$rank" != 0 ]; then
    exec >> "$log_dir/rank-$(printf %05d "$rank").log" 2>&1
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) rank $rank $job ==="
fi
[ -n "$log_dir" ] && [ "$rank" = 0 ] && \
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) start $job world=${WORLD_SIZE:-1}" >> "$log_dir/events.log"
"$@"
rc=$?
[ -n "$log_dir" ] && [ "$rank" = 0 ] && \
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) exit rc=$rc $job" >> "$log_dir/events.log"
if [ "$rc" = 75 ] && [ -n "${LONGCAT_REQUEUE_MARKER:-}" ]; then
    : > "$LONGCAT_REQUEUE_MARKER"
fi
# Every other non-zero exit (2 bad input, 76 hang watchdog, crashes) is appended for the batch shell,
# which decides on a crash requeue from it (torchrun's own exit code is 1 for all of them).
if [ "$rc" != 0 ] && [ "$rc" != 75 ] && [ -n "${LONGCAT_EXIT_CODES:-}" ]; then
    echo "$rc" >> "$LONGCAT_EXIT_CODES"
fi
# torchrun made this shell a process-group leader. Helpers the rank spawned (megatron's checkpoint
# writer Manager, multiprocessing's resource tracker) outlive a rank that was killed, keep the job's
# output open (SLURM then waits 60 s) and, re-parented to init, escape proctrack/linuxproc: end them.
leftovers="$(pgrep -g "$$" | grep -vx "$$")"
# shellcheck disable=SC2086
[ -n "$leftovers" ] && kill -KILL $leftovers 2>/dev/null
exit "$rc"
