"""Recovery from crashes and hangs, without SLURM (the requeue on SLURM is in tests/test_slurm_chain.py).

* An injected hang: the watchdog (train.hang_timeout_mins, a few seconds here) dumps the Python stacks
  of the hung rank into LONGCAT_LOG_DIR, records the failure and exits 76.
* An injected crash: the uncaught exception is recorded with its iteration (LONGCAT_FAILURE_FILE).
* launch/common.sh's decision on these records: requeue, but not a failure identical to the
  previous one (same iteration, same reason), and at most MAX_CRASH_REQUEUES times.
"""

from __future__ import annotations

import os
import subprocess
import sys

from longcat_megatron.runtime import free_port
from tests.train_utils import ROOT, TINY


def _start(tmp, name: str, fault: str, *overrides: str) -> subprocess.Popen:
    d = tmp / name
    d.mkdir()
    env = dict(os.environ, LONGCAT_FAULT_INJECT=fault, LONGCAT_LOG_DIR=str(d / "logs"),
               LONGCAT_FAILURE_FILE=str(d / "failures"), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-W", "ignore", "-m", "longcat_megatron.train", "--config", TINY,
           "train.train_iters=50", f"checkpoint.save={d / 'ckpt'}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_hang_is_dumped_and_exits_76_and_a_crash_is_recorded(tmp_path):
    hang = _start(tmp_path, "hang", "hang_after_step:2", "train.hang_timeout_mins=0.05")
    crash = _start(tmp_path, "crash", "crash_after_step:3", "train.hang_timeout_mins=0.05")
    hang_out, _ = hang.communicate(timeout=240)
    crash_out, _ = crash.communicate(timeout=240)

    assert hang.returncode == 76, hang_out[-3000:]
    stacks = (tmp_path / "hang" / "logs" / "hang-stacks-rank00000.txt").read_text()
    assert "no training step completed for" in stacks and "last completed iteration 2" in stacks
    # every thread's stack, the hung main thread inside the injected hang
    assert "in maybe_inject" in stacks and "in train" in stacks and "Thread 0x" in stacks
    assert "[watchdog] rank 0: no training step completed" in hang_out and "exiting with 76" in hang_out
    assert (tmp_path / "hang" / "failures").read_text() == \
        "2\thang: no step completed within train.hang_timeout_mins=0.05\n"

    assert crash.returncode == 1, crash_out[-3000:]
    assert "InjectedCrash: injected crash after iteration 3" in crash_out  # the traceback still shows
    assert (tmp_path / "crash" / "failures").read_text() == \
        "3\tInjectedCrash: injected crash after iteration 3\n"


def _bash(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source launch/common.sh; {script}"], cwd=ROOT, text=True,
                          capture_output=True, env=dict(os.environ, **env), timeout=60)


def test_crash_requeue_decision(tmp_path):
    records = tmp_path / "failures"
    records.write_text("3\tInjectedCrash: injected crash after iteration 3\n"
                       "3\tRuntimeError: Connection closed by peer\n")
    out = _bash(f'lc_failure_signature "{records}" /nonexistent 1')
    assert out.stdout.strip() == "iteration 3: InjectedCrash: injected crash after iteration 3"
    codes = tmp_path / "codes"
    codes.write_text("-9\n1\n")
    out = _bash(f'LC_COMMITTED_AT_START=5 lc_failure_signature /nonexistent "{codes}" 1')
    assert out.stdout.strip() == "exit 1 (rank exits -9 1) after checkpoint 5"

    history = tmp_path / "history"
    decide = f'lc_crash_decision "{history}" "$JOB" "$SIG"; echo "rc=$?"'
    first = _bash(decide, JOB="7", SIG="iteration 3: A")
    assert "rc=0" in first.stdout and "failure 1 of at most 3" in first.stdout
    # the same failure at the same iteration again: a deterministic failure, not requeued
    again = _bash(decide, JOB="7", SIG="iteration 3: A")
    assert "rc=1" in again.stdout and "the same failure as this job's previous run" in again.stdout
    # different failures are requeued up to MAX_CRASH_REQUEUES (per job)
    assert "rc=0" in _bash(decide, JOB="8", SIG="iteration 3: A", MAX_CRASH_REQUEUES="2").stdout
    assert "rc=0" in _bash(decide, JOB="8", SIG="iteration 9: B", MAX_CRASH_REQUEUES="2").stdout
    third = _bash(decide, JOB="8", SIG="iteration 12: C", MAX_CRASH_REQUEUES="2")
    assert "rc=1" in third.stdout and "already failed 2 time(s) (MAX_CRASH_REQUEUES=2)" in third.stdout
    assert "rc=1" in _bash(decide, JOB="9", SIG="x", MAX_CRASH_REQUEUES="0").stdout
