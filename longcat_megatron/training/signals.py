"""Stop requests: SIGTERM/SIGUSR1 (SLURM's pre-timeout warning, ``scancel --signal``) and a wall-clock
limit. Ranks agree on stopping through an all-reduce, so they all save the same iteration.

SLURM signals *every* process of a job step, not only the rank: helper processes must survive the
signal, or the save it asks for fails. Forked helpers inherit the Python handler (harmless), but
megatron's checkpoint writer keeps a *spawned* ``multiprocessing`` Manager (fresh interpreter,
default action = die on SIGUSR1/SIGTERM); :func:`shield_spawned_checkpoint_helpers` makes it start
with those signals blocked.
"""

from __future__ import annotations

import functools
import signal
import threading
import time


# Exit code meaning "saved a checkpoint and stopped early: requeue me" (EX_TEMPFAIL).
EXIT_REQUEUE = 75


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _spawn_with_stop_signals_blocked(create):
    """Call ``create()`` (which spawns a process) with the stop signals blocked in this thread: the
    child inherits the mask and never acts on them; a signal arriving meanwhile stays pending here and
    is handled once unblocked (nothing is lost)."""
    if threading.current_thread() is not threading.main_thread():
        return create()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return create()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def shield_spawned_checkpoint_helpers() -> None:
    """Make megatron-core's checkpoint-writer results queue (a spawned Manager process, created on the
    first save) immune to SIGUSR1/SIGTERM sent to the whole job step. Idempotent."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    original = getattr(fa, "_get_write_results_queue", None)
    if original is None or getattr(original, "_longcat_shielded", False):
        return

    @functools.wraps(original)
    def shielded():
        if fa._results_queue is not None:
            return fa._results_queue
        return _spawn_with_stop_signals_blocked(original)

    shielded._longcat_shielded = True
    fa._get_write_results_queue = shielded


class StopRequest:
    """Collects stop reasons; :meth:`agreed` is collective (call it on every rank each step)."""

    def __init__(self, handle_signals: bool = True, exit_duration_mins: float = 0.0):
        self.received: str | None = None
        self.started = time.monotonic()
        self.limit_s = exit_duration_mins * 60.0
        self._previous = {}
        if handle_signals:
            shield_spawned_checkpoint_helpers()
            for sig in _STOP_SIGNALS:
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
        from longcat_megatron import collectives

        # The flag goes through the helper: under NCCL it must be a CUDA tensor.
        if not collectives.any_rank(self.local_reason() is not None):
            return None
        return self.local_reason() or "signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
