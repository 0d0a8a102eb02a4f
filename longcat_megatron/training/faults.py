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

Hardware faults (the silent-data-corruption tests, training/sdc.py), once per process (a transient
fault: a re-run or replay of the same step computes correctly):

- ``transient_nan:ITER[:RANK]``: the loss of the first micro-batch of step ITER is NaN, once;
- ``bit_flip:ITER[:RANK[:BIT]]``: one bit (default 12: a mantissa bit of an fp32 value, a relative
  change of ~5e-4; use BIT <= 6 for a 16-bit output) of the first element of the model chunk's
  output flips in the first forward of step ITER, once: a silent wrong result that trains on.

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


# ---- numerical and hardware faults (stability and SDC tests) -----------------------------------------
_NUMERIC = ("nan_loss", "spike_loss", "nan_grad", "transient_nan", "bit_flip")
_fired: set = set()  # the once-per-process faults that already fired


def _numeric_fault(kinds: tuple) -> list:
    """The fields of ``LONGCAT_FAULT_INJECT`` if it names one of ``kinds`` for the step after the last
    noted one (:func:`note_progress`) on this rank; else an empty list."""
    spec = os.environ.get("LONGCAT_FAULT_INJECT", "")
    parts = spec.split(":")
    if parts[0] not in kinds or len(parts) < 2:
        return []
    first, _, last = parts[1].partition("-")
    step = (_last_iteration[0] or 0) + 1
    if not int(first) <= step <= int(last or first):
        return []
    if len(parts) > 2 and parts[2] != "*":
        import torch.distributed as dist

        if int(parts[2]) != (dist.get_rank() if dist.is_initialized() else 0):
            return []
    return parts


def _fire_once(kind: str) -> bool:
    """True the first time a once-per-process fault fires (and LONGCAT_FAULT_ONCE's file is absent)."""
    if kind in _fired:
        return False
    once = os.environ.get("LONGCAT_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return False
        open(once, "a").close()
    _fired.add(kind)
    return True


def maybe_corrupt_loss(loss):
    """``loss`` as ``nan_loss`` / ``spike_loss`` / ``nan_grad`` / ``transient_nan`` ask for it in
    this step; unchanged otherwise."""
    parts = _numeric_fault(_NUMERIC[:4])
    if not parts:
        return loss
    if parts[0] == "nan_loss":
        return loss * float("nan")
    if parts[0] == "transient_nan":
        return loss * float("nan") if _fire_once("transient_nan") else loss
    if parts[0] == "nan_grad":
        import torch

        class NanGradient(torch.autograd.Function):  # identity forward, NaN backward
            forward = staticmethod(lambda ctx, x: x.clone())
            backward = staticmethod(lambda ctx, grad: grad * float("nan"))

        return NanGradient.apply(loss)
    return loss * (float(parts[3]) if len(parts) > 3 else 100.0)


def install_bit_flip(model_chunks: list) -> None:
    """With ``LONGCAT_FAULT_INJECT=bit_flip:...``: a forward hook on this rank's first model chunk
    that flips one bit of its output in the first forward of the chosen step (once). No-op otherwise."""
    if not os.environ.get("LONGCAT_FAULT_INJECT", "").startswith("bit_flip:"):
        return
    import torch

    class FlipBit(torch.autograd.Function):  # the flipped value forward, the gradient unchanged
        @staticmethod
        def forward(ctx, x, bit):
            out = x.detach().clone().contiguous()
            ints = out.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]).reshape(-1)
            ints[0] ^= 1 << bit
            return out

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    def hook(module, args, output):
        parts = _numeric_fault(("bit_flip",))
        if not parts or torch._C._current_graph_task_id() != -1:  # not in a backward recompute
            return output
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if not (torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel()):
            return output
        if not _fire_once("bit_flip"):
            return output
        flipped = FlipBit.apply(tensor, int(parts[3]) if len(parts) > 3 else 12)
        print(f"[fault] bit_flip: flipped a bit of {type(module).__name__}'s output at iteration "
              f"{(_last_iteration[0] or 0) + 1}", flush=True)
        return (flipped, *output[1:]) if isinstance(output, (tuple, list)) else flipped

    model_chunks[0].register_forward_hook(hook)


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
