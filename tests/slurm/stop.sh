#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/start.sh: cancel jobs, shut the daemons down (only the pids
# in its pid files are signalled). Safe to run when nothing is running.
BASE=${LOCAL_SLURM_DIR:-/tmp/longcat-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
running() { [ -n "$1" ] && ps -o stat= -p "$1" 2>/dev/null | grep -qv Z; }
wait_gone() {
  local p=$1
  for _ in $(seq 100); do running "$p" || return 0; sleep 0.1; done
  kill -TERM "$p" 2>/dev/null; sleep 1; running "$p" && kill -KILL "$p" 2>/dev/null; return 0
}
# read the pids first: the daemons remove their pid files early during shutdown
CTLD=$(cat "$BASE/run/slurmctld.pid" 2>/dev/null); SLURMD=$(cat "$BASE/run/slurmd.pid" 2>/dev/null)
MUNGED=$(cat "$BASE/munge/munged.pid" 2>/dev/null)
if running "$CTLD"; then
  jobs=$(squeue -h -o %A 2>/dev/null)
  [ -n "$jobs" ] && scancel $jobs 2>/dev/null
  # let steps and epilogs finish while slurmctld still listens (else slurmd retries for ~10 s)
  for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  scontrol shutdown >/dev/null 2>&1
fi
for p in $SLURMD $CTLD; do wait_gone "$p"; done
if running "$MUNGED"; then kill -TERM "$MUNGED"; wait_gone "$MUNGED"; fi
rm -f "$BASE"/run/*.pid "$BASE/munge/munged.pid"
echo "local SLURM stopped"
