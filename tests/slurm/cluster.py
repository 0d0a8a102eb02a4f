"""pytest helpers for the one-node localhost SLURM cluster (tests/slurm/{install,start,stop}.sh).

``slurm_cluster`` (session fixture) installs SLURM + munge when missing, starts the cluster and stops it
at the end if it started it. It skips the tests, with the reason, when SLURM cannot be installed or
started (not root, no apt-get, no network); with ``LONGCAT_REQUIRE_SLURM=1`` (CI) it fails instead.
``Job`` submits a launch script with ``sbatch`` and waits for it, reading state via ``scontrol``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = os.environ.get("LOCAL_SLURM_DIR", "/tmp/longcat-slurm")
SLURM_CONF = os.path.join(BASE, "etc", "slurm.conf")


def _unavailable(reason: str):
    if os.environ.get("LONGCAT_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required (LONGCAT_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no local SLURM cluster: {reason}")


def _run_script(name: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(HERE, name)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local cluster; yields the environment for SLURM client commands."""
    if os.geteuid() != 0:
        _unavailable("tests/slurm/start.sh needs root (slurmd must switch to the job user)")
    inst = _run_script("install.sh", timeout=600)
    if inst.returncode != 0:
        _unavailable(f"tests/slurm/install.sh failed: {(inst.stderr or inst.stdout).strip()[-500:]}")
    start = _run_script("start.sh", timeout=120)
    if start.returncode != 0:
        _unavailable(f"tests/slurm/start.sh failed: {(start.stderr or start.stdout).strip()[-800:]}")
    already = "already running" in start.stdout  # started by someone else: leave it running
    env = dict(os.environ, SLURM_CONF=SLURM_CONF)
    yield env
    if not already:
        _run_script("stop.sh", timeout=120)


def job_fields(job_id: str, env: dict) -> dict:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                         text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Job:
    """One sbatch job of a launch script, with its own log file."""

    def __init__(self, script: str, env: dict, log: str, args=(), sbatch_args=()):
        cmd = ["sbatch", "--parsable", "-o", log, *sbatch_args, os.path.join(ROOT, script), *args]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        self.id = out.stdout.strip().split(";")[0]
        self.env, self.log = env, log

    def fields(self) -> dict:
        return job_fields(self.id, self.env)

    def text(self) -> str:
        return open(self.log).read() if os.path.isfile(self.log) else ""

    def wait_state(self, states: tuple, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.fields().get("JobState", "")
            if state in states:
                return state
            time.sleep(0.2)
        raise AssertionError(f"job {self.id} not in {states} after {timeout}s "
                             f"(state {self.fields().get('JobState')}); log:\n{self.text()[-3000:]}")

    def wait_log(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text(), re.M):
                return
            if self.fields().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                break
            time.sleep(0.1)
        raise AssertionError(f"job {self.id}: no line matching {pattern!r}; log:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 400) -> dict:
        """Wait until the job has ended for good; returns its scontrol fields."""
        self.wait_state(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), timeout)
        return self.fields()

    def live_processes(self) -> list[str]:
        """Command lines of processes (not zombies) still carrying this job's SLURM_JOB_ID."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                argv = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"SLURM_JOB_ID={self.id}".encode() in environ and stat != "Z":
                found.append(f"{pid}: {argv[:120]}")
        return found

    def rank_pid(self, rank: int) -> int:
        """PID of this job's training process of global rank ``rank`` (python -m longcat_megatron.train)."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"longcat_megatron.train" not in argv or b"-m" not in argv:
                continue
            if os.path.basename(argv[0]).startswith(b"python") and \
                    f"SLURM_JOB_ID={self.id}".encode() in environ and f"RANK={rank}".encode() in environ:
                return int(pid)
        raise AssertionError(f"job {self.id}: no process of rank {rank} found")
