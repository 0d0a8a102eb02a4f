"""Stop signals always end in a committed save and exit 75, however many saves came before; the rank's
checkpoint helpers never outlive it.

The trainer runs as a real process here (not under tests.harness, whose parent already owns a
multiprocessing resource tracker that the ranks would inherit): the signal goes to the rank and to all
its descendants (the resource tracker, megatron's writer Manager), as SLURM signals a job step.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from longcat_megatron.runtime import free_port
from tests.train_utils import ROOT, TINY


def _rank_env(extra: dict) -> dict:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               TORCHDYNAMO_DISABLE="1", PYTHONPATH=ROOT, LONGCAT_FORCE_CPU="1")
    env.update(extra)
    return env


@pytest.mark.parametrize("async_save", [False, True])
def test_sigterm_after_two_saves_commits_and_exits_75(tmp_path, async_save):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "longcat_megatron.train", "--config", TINY,
           "train.train_iters=8", "checkpoint.save_interval=2", f"checkpoint.save={ckpt}",
           f"checkpoint.async_save={str(async_save).lower()}", "parallel.backend=gloo"]
    env = _rank_env({"LONGCAT_FAULT_INJECT": "signal_after_step:5:*:SIGTERM"})
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 75, out[-3000:]
    assert "[stop] SIGTERM" in out, out[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (ckpt / "iter_0000002").is_dir() and (ckpt / "iter_0000004").is_dir()


_HELPER_SCRIPT = r"""
import os, sys, time
from longcat_megatron.training.signals import shield_spawned_checkpoint_helpers
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
shield_spawned_checkpoint_helpers()
fa._get_write_results_queue().put(1)
print(os.getpid(), flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list:
    from longcat_megatron.training.faults import _descendants

    return _descendants(pid)


def test_checkpoint_helpers_die_with_their_rank():
    """kill -9 of a rank that started the writer Manager and the resource tracker leaves neither."""
    proc = subprocess.Popen([sys.executable, "-c", _HELPER_SCRIPT], env=_rank_env({}), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert int(proc.stdout.readline()) == proc.pid
        helpers = _children(proc.pid)
        assert len(helpers) >= 2, helpers  # resource tracker + Manager
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = helpers
        while alive and time.monotonic() < deadline:
            alive = [p for p in helpers if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"helpers outlived their rank: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _descendant_pids_alive(pids: list) -> list:
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("how", ["ctrl-c", "sigusr1-to-torchrun"])
def test_local_launcher_forwards_stop_signals(tmp_path, how):
    """launch/local.sh: Ctrl-C (SIGINT to the foreground process group) or SIGUSR1 to torchrun alone
    reaches the rank, which saves and stops; the script exits 75 and no process of the run is left."""
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, LONGCAT_CPU="1", OMP_NUM_THREADS="1", LONGCAT_SKIP_PREFLIGHT="1",
               TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "1", TINY, "train.train_iters=100000",
         f"checkpoint.save={ckpt}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    tree = []
    try:
        deadline = time.monotonic() + 180
        while not any("iter      2/" in line for line in list(lines)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-2000:]
            time.sleep(0.2)
        tree = _children(proc.pid)
        torchrun = [p for p in tree if "torch.distributed.run" in _cmdline(p)]
        assert torchrun, "".join(lines)[-2000:]
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(torchrun[0], signal.SIGUSR1)
        rc = proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:  # whatever the launcher left behind (orphaned ranks have their own session)
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    out = "".join(lines)
    assert rc == 75, out[-3000:]
    assert "[stop] SIG" in out, out[-3000:]
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) >= 2
    assert not reader.is_alive(), "a process of the run still holds the output open"
    time.sleep(1)
    assert not _descendant_pids_alive(tree), [(p, _cmdline(p)) for p in tree if _alive(p)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


# ---- the wrapper itself is signalled (timeout, kill PID): it forwards once, waits, exits 75 -----
def _start_wrapper(tmp_path, ckpt, nproc: int, iters: int, prefix: tuple = ()):
    env = dict(os.environ, LONGCAT_CPU="1", OMP_NUM_THREADS="1", LONGCAT_SKIP_PREFLIGHT="1",
               TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [*prefix, "bash", os.path.join(ROOT, "launch", "local.sh"), str(nproc), TINY,
         f"train.train_iters={iters}", f"checkpoint.save={ckpt}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines, reader


def _wait_for(proc, lines, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(lines)):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-2000:]
        time.sleep(0.2)


def _run_tree(pid: int) -> list:
    """The wrapper's descendants, ranks included (they run in sessions of their own)."""
    tree = _children(pid)
    assert any("torch.distributed.run" in _cmdline(p) for p in tree), tree
    assert any("longcat_megatron.train" in _cmdline(p) for p in tree), tree
    return tree


def _finish(proc, reader, tree: list, timeout: float = 120) -> int:
    try:
        rc = proc.wait(timeout=timeout)
        # What is still alive the moment the wrapper has returned: an orphan (killed for the next test).
        left = [(p, _cmdline(p)) for p in tree if _alive(p)]
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for p, _ in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the run outlived the wrapper (rc {rc}): {left}"
    return rc


def test_timeout_bounded_local_run_saves_exits_75_and_resumes(tmp_path):
    """`timeout --preserve-status -s TERM N bash launch/local.sh 2 ...`: at expiry timeout sends
    SIGTERM to the wrapper and to its process group (SIGALRM to timeout is exactly its expiry). The
    wrapper used to die at once (exit 143) while torchrun and the ranks went on saving without it."""
    ckpt = tmp_path / "ckpt"
    proc, lines, reader = _start_wrapper(tmp_path, ckpt, 2, 100000,
                                         prefix=("timeout", "--preserve-status", "-s", "TERM", "900"))
    _wait_for(proc, lines, "iter      2/")
    tree = _run_tree(proc.pid)
    os.kill(proc.pid, signal.SIGALRM)  # the time limit expires now
    rc = _finish(proc, reader, tree)
    out = "".join(lines)
    assert rc == 75, out[-3000:]
    assert "[stop] SIGTERM" in out, out[-3000:]
    committed = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert committed >= 2
    # Run again: it resumes from the committed checkpoint and finishes.
    proc, lines, reader = _start_wrapper(tmp_path, ckpt, 2, committed + 1)
    rc = _finish(proc, reader, [], timeout=180)
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert f"at iteration {committed}" in out and "resumed from" in out, out[-3000:]
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) == committed + 1


def test_signals_to_the_wrapper_pid_are_forwarded_once(tmp_path):
    """`kill -HUP PID` (a closed terminal) then `kill -TERM PID` of the wrapper alone: the ranks get one
    SIGTERM through torchrun (SIGHUP would kill them unsaved), the second signal is only reported,
    and nothing outlives the wrapper, which exits 75."""
    ckpt = tmp_path / "ckpt"
    proc, lines, reader = _start_wrapper(tmp_path, ckpt, 1, 100000)
    _wait_for(proc, lines, "iter      2/")
    tree = _run_tree(proc.pid)
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, reader, tree)
    out = "".join(lines)
    assert rc == 75, out[-3000:]
    assert "[stop] SIGTERM" in out, out[-3000:]
    assert "already stopping" in out, out[-3000:]
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) >= 2
