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
trap '' USR1
trap ':' TERM INT
"$@"
rc=$?
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
