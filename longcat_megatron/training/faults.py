"""Fault injection for tests of the crash/preemption/hang paths, and failure records for the launcher.

Injection is off unless ``LONGCAT_FAULT_INJECT=POINT:ITER[:RANK]`` is set; it triggers at POINT when
the iteration is ITER (on every rank, or only on RANK):

- ``kill_during_save``: SIGKILL after the shards of ITER are written, before the commit;
- ``signal_after_step``: SIGUSR1 to this process after step ITER (a preemption warning);
  ``signal_after_step:ITER:RANK:SIGTERM`` (RANK may be ``*``) sends the named signal to this process
  and all its descendants (the checkpoint helpers), as SLURM signals every process of a job step.
- ``crash_after_step``: raise :class:`InjectedCrash` after step ITER (a software crash);
- ``hang_after_step``: block forever after step ITER (a hung collective; the watchdog ends it).

Numerical faults (the stability guard's tests, training/stability.py), in the loss of every
micro-batch of step ITER (``ITER`` may be a range ``A-B``):

- ``nan_loss:ITER[:RANK]``: the loss becomes NaN (so do the gradients);
- ``spike_loss:ITER[:RANK[:FACTOR]]``: the loss is multiplied by FACTOR (default 100);
- ``nan_grad:ITER[:RANK]``: the loss stays finite, its gradient is NaN (megatron's found_inf case).

``LONGCAT_FAULT_ONCE=PATH`` makes the injection happen only while PATH does not exist (it is created
when the fault fires), so a requeued job runs clean.

Failure records: when ``LONGCAT_FAILURE_FILE`` is set (launch/common.sh sets it per job run), a rank
that dies of an uncaught exception or a hang appends ``ITERATION<TAB>REASON`` to it, ITERATION being
the last completed step. The launcher compares these records across requeues to stop requeueing a
job that fails the same way at the same iteration again (a deterministic bug, not a flaky node).
"""

from __future__ import annotations

import os
import signal
import sys
import time

_SIGNALS = {"kill_during_save": signal.SIGKILL, "signal_after_step": signal.SIGUSR1}
_last_iteration: list = [None]


class InjectedCrash(RuntimeError):
    """The crash that ``crash_after_step`` injects."""


def maybe_inject(point: str, iteration: int, rank: int) -> None:
    """Inject the fault of ``point`` if the environment asks for it here."""
    spec = os.environ.get("LONGCAT_FAULT_INJECT", "")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != iteration:
        return
    if len(parts) > 2 and parts[2] != "*" and int(parts[2]) != rank:
        return
    if len(parts) > 3:
        sig = signal.Signals[parts[3]]
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        os.kill(os.getpid(), sig)
        return
    once = os.environ.get("LONGCAT_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "a").close()
    if point in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[point])
    elif point == "crash_after_step":
        raise InjectedCrash(f"injected crash after iteration {iteration}")
    elif point == "hang_after_step":
        while True:
            time.sleep(3600)


# ---- numerical faults (stability tests) ------------------------------------------------------------
def maybe_corrupt_loss(loss):
    """``loss`` as ``nan_loss`` / ``spike_loss`` ask for it in the step after the last noted one
    (:func:`note_progress`); unchanged otherwise."""
    spec = os.environ.get("LONGCAT_FAULT_INJECT", "")
    if not spec.startswith(("nan_loss:", "spike_loss:", "nan_grad:")):
        return loss
    parts = spec.split(":")
    first, _, last = parts[1].partition("-")
    step = (_last_iteration[0] or 0) + 1
    if not int(first) <= step <= int(last or first):
        return loss
    if len(parts) > 2 and parts[2] != "*":
        import torch.distributed as dist

        if int(parts[2]) != (dist.get_rank() if dist.is_initialized() else 0):
            return loss
    if parts[0] == "nan_loss":
        return loss * float("nan")
    if parts[0] == "nan_grad":
        import torch

        class NanGradient(torch.autograd.Function):  # identity forward, NaN backward
            forward = staticmethod(lambda ctx, x: x.clone())
            backward = staticmethod(lambda ctx, grad: grad * float("nan"))

        return NanGradient.apply(loss)
    return loss * (float(parts[3]) if len(parts) > 3 else 100.0)


def note_progress(iteration: int) -> None:
    """Remember the last completed iteration (for failure records)."""
    _last_iteration[0] = iteration


def record_failure(reason: str) -> None:
    """Append ``ITERATION<TAB>REASON`` to ``$LONGCAT_FAILURE_FILE`` (no-op when unset)."""
    path = os.environ.get("LONGCAT_FAILURE_FILE")
    if not path:
        return
    line = " ".join(reason.split())[:300]
    try:
        with open(path, "a") as f:
            f.write(f"{_last_iteration[0] if _last_iteration[0] is not None else '-'}\t{line}\n")
    except OSError:
        pass


def install_failure_recorder() -> None:
    """Record uncaught exceptions of this process (then report them as before). Idempotent."""
    previous = sys.excepthook
    if getattr(previous, "_longcat_records", False):
        return

    def hook(exc_type, exc, tb):
        first = str(exc).splitlines()[0] if str(exc) else ""
        record_failure(f"{exc_type.__name__}: {first}")
        previous(exc_type, exc, tb)

    hook._longcat_records = True
    sys.excepthook = hook


def _descendants(pid: int) -> list:
    """Process ids below ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out
