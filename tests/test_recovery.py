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
    assert not (tmp_path / "crash" / "logs" / "hang-stacks-rank00000.txt").exists()  # no empty dump left


def test_watchdog_backstop_fires_while_the_gil_is_held(tmp_path):
    """A main thread stuck in C code that holds the GIL silences the watchdog thread; faulthandler's
    timer (no GIL needed) still dumps the stacks and ends the process."""
    code = ("from longcat_megatron.training.watchdog import HangWatchdog\n"
            f"HangWatchdog(0.01, {str(tmp_path)!r}, 3, backstop_grace_s=1).start(7)\n"
            "sum(range(10**12))  # C loop holding the GIL\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr[-2000:]
    stacks = (tmp_path / "hang-stacks-rank00003.txt").read_text()
    assert "Timeout (0:00:01.6" in stacks and 'File "<string>", line 3 in <module>' in stacks, stacks


def _bash(script: str) -> str:
    out = subprocess.run(["bash", "-c", f"source launch/common.sh; {script}"], cwd=ROOT, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_crash_requeue_decision(tmp_path):
    records, codes, history = tmp_path / "failures", tmp_path / "codes", tmp_path / "history"
    records.write_text("3\tInjectedCrash: injected crash after iteration 3\n"
                       "3\tRuntimeError: Connection closed by peer\n")
    codes.write_text("-9\n1\n")
    decide = 'lc_crash_decision "{h}" {job} "{sig}"; echo "rc=$?"'.format
    out = _bash("; ".join([
        f'lc_failure_signature "{records}" /nonexistent 1',
        f'LC_COMMITTED_AT_START=5 lc_failure_signature /nonexistent "{codes}" 1',
        decide(h=history, job=7, sig="iteration 3: A"),
        decide(h=history, job=7, sig="iteration 3: A"),   # identical -> stop
        "MAX_CRASH_REQUEUES=2",
        decide(h=history, job=8, sig="iteration 3: A"),
        decide(h=history, job=8, sig="iteration 9: B"),
        decide(h=history, job=8, sig="iteration 12: C"),  # third failure of job 8 -> stop
        "MAX_CRASH_REQUEUES=0",
        decide(h=history, job=9, sig="x"),
    ])).splitlines()
    assert out[0] == "iteration 3: InjectedCrash: injected crash after iteration 3"  # the first record
    assert out[1] == "exit 1 (rank exits -9 1) after checkpoint 5"  # no record: the exit codes
    rcs = [line for line in out if line.startswith("rc=")]
    assert rcs == ["rc=0", "rc=1", "rc=0", "rc=0", "rc=1", "rc=1"], out
    text = "\n".join(out)
    assert "requeueing after failure 1 of at most 3 (MAX_CRASH_REQUEUES)" in text
    assert "the same failure as this job's previous run (iteration 3: A): not requeueing" in text
    assert "job 8 already failed 2 time(s) (MAX_CRASH_REQUEUES=2): not requeueing" in text
    assert "job 9 already failed 0 time(s) (MAX_CRASH_REQUEUES=0)" in text


def test_exit_duration_clock_starts_at_job_start(monkeypatch):
    """The limit counts from the job's start (the launcher's LONGCAT_JOB_START_TIME), not from the
    trainer's: a trainer that starts 50 s into a 1-minute budget stops after ~10 s of its own."""
    import time

    from longcat_megatron.training.signals import StopRequest, job_start_time

    now = time.time()
    monkeypatch.setenv("LONGCAT_JOB_START_TIME", str(int(now) - 50))
    assert job_start_time() == int(now) - 50
    stop = StopRequest(False, exit_duration_mins=1.0, started_at=job_start_time())
    assert stop.local_reason() is None
    stop.started -= 11  # 61 s since the job started
    assert stop.local_reason() == "exit-duration limit"
    monkeypatch.delenv("LONGCAT_JOB_START_TIME")
    monkeypatch.delenv("SLURM_JOB_START_TIME", raising=False)
    import psutil

    assert job_start_time() == psutil.Process().create_time()  # no launcher: this process's start
    out = _bash("SLURM_JOB_START_TIME=1700000000 lc_job_start_time; unset SLURM_JOB_START_TIME SLURM_JOB_ID; "
                "lc_job_start_time; lc_slurm_minutes 1-02:03:04; lc_slurm_minutes 30:00; lc_slurm_minutes UNLIMITED")
    lines = out.splitlines()
    assert lines[0] == "1700000000" and abs(int(lines[1]) - now) < 120
    assert lines[2:] == [str(24 * 60 + 2 * 60 + 3), "30"]
