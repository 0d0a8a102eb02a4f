"""Fault injection for tests of the crash/preemption paths (off unless LONGCAT_FAULT_INJECT is set).

``LONGCAT_FAULT_INJECT=POINT:ITER[:RANK]`` triggers at POINT when the iteration is ITER (on every
rank, or only on RANK):

- ``kill_during_save``: SIGKILL after the shards of ITER are written, before the commit;
- ``signal_after_step``: SIGUSR1 to this process after step ITER (a preemption warning);
  ``signal_after_step:ITER:RANK:SIGTERM`` (RANK may be ``*``) sends the named signal to this process
  and all its descendants (the checkpoint helpers), as SLURM signals every process of a job step.
"""

from __future__ import annotations

import os
import signal

_ACTIONS = {"kill_during_save": signal.SIGKILL, "signal_after_step": signal.SIGUSR1}


def maybe_inject(point: str, iteration: int, rank: int) -> None:
    """Send this process the signal of ``point`` if the environment asks for it here."""
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
    os.kill(os.getpid(), _ACTIONS[point])


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
