"""Stop requests: SIGTERM/SIGUSR1 (SLURM's pre-timeout warning, ``scancel --signal``) and a wall-clock
limit. Ranks agree on stopping through an all-reduce, so they all save the same iteration."""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

# Exit code meaning "saved a checkpoint and stopped early: requeue me" (EX_TEMPFAIL).
EXIT_REQUEUE = 75


class StopRequest:
    """Collects stop reasons; :meth:`agreed` is collective (call it on every rank each step)."""

    def __init__(self, handle_signals: bool = True, exit_duration_mins: float = 0.0):
        self.received: str | None = None
        self.started = time.monotonic()
        self.limit_s = exit_duration_mins * 60.0
        self._previous = {}
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.received:
            return self.received
        if self.limit_s and time.monotonic() - self.started >= self.limit_s:
            return "exit-duration limit"
        return None

    def agreed(self) -> str | None:
        """The stop reason if any rank wants to stop (the same answer on every rank)."""
        flag = torch.tensor([1 if self.local_reason() else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return None
        return self.local_reason() or "signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
