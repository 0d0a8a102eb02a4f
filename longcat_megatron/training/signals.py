"""Stop requests: SIGTERM/SIGUSR1/SIGINT (SLURM's pre-timeout warning, ``scancel --signal``, Ctrl-C
forwarded by torchrun) and a wall-clock limit. Ranks agree on stopping through an all-reduce, so they
all save the same iteration.

SLURM signals *every* process of a job step, not only the rank: helper processes must survive the
signal, or the save it asks for fails. Forked helpers inherit the Python handler (harmless), but
megatron's checkpoint writer keeps a *spawned* ``multiprocessing`` Manager (fresh interpreter,
default action = die on SIGUSR1/SIGTERM); :func:`shield_spawned_checkpoint_helpers` makes it start
with those signals blocked, and so is multiprocessing's resource tracker, which is started *before*
the signals are blocked (its start unblocks SIGINT/SIGTERM in the caller, which would otherwise let the
Manager start unshielded from the second spawn on). Both helpers die with their rank: the Manager
gets ``PR_SET_PDEATHSIG`` (Linux), and the tracker exits when the last process holding its pipe
(the rank, the Manager) is gone.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time


# Exit code meaning "saved a checkpoint and stopped early: requeue me" (EX_TEMPFAIL).
EXIT_REQUEUE = 75


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _ensure_resource_tracker_shielded() -> None:
    """Start multiprocessing's resource tracker (if not running) with SIGUSR1 blocked. Its start blocks
    and then *unblocks* SIGINT/SIGTERM in the calling thread (it ignores those two itself), so it must
    run before, not inside, a block of the stop signals."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _spawn_with_stop_signals_blocked(create):
    """Call ``create()`` (which spawns a process) with the stop signals blocked in this thread: the
    child inherits the mask and never acts on them; a signal arriving meanwhile stays pending here and
    is handled once unblocked (nothing is lost)."""
    if threading.current_thread() is not threading.main_thread():
        return create()
    _ensure_resource_tracker_shielded()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return create()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_results_queue():
    """megatron's write-results queue (a spawned Manager's Queue), its server tied to this process."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from longcat_megatron.training.helper_lifetime import die_with_parent

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(die_with_parent, (os.getpid(),))
    return manager.Queue()  # the proxy keeps the manager referenced


def shield_spawned_checkpoint_helpers() -> None:
    """Make megatron-core's checkpoint-writer results queue (a spawned Manager process, created on the
    first save) immune to the stop signals sent to the whole job step, and make it die with the rank.
    Idempotent."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    original = getattr(fa, "_get_write_results_queue", None)
    if original is None or getattr(original, "_longcat_shielded", False):
        return

    @functools.wraps(original)
    def shielded():
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the creating *thread* ends: only tie it to the main thread
            return original()
        if fa._results_queue is None:
            fa._results_queue = _spawn_with_stop_signals_blocked(_start_results_queue)
        return fa._results_queue

    shielded._longcat_shielded = True
    fa._get_write_results_queue = shielded


def job_start_time() -> float:
    """When the job started (epoch seconds), the origin of ``train.exit_duration_mins``: the
    launcher's ``LONGCAT_JOB_START_TIME`` (launch/common.sh: SLURM's StartTime of this run),
    else ``SLURM_JOB_START_TIME``, else the start of this process."""
    for name in ("LONGCAT_JOB_START_TIME", "SLURM_JOB_START_TIME"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return float(value)
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing/unsupported: the clock starts now
        return time.time()


class StopRequest:
    """Collects stop reasons; :meth:`agreed` is collective (call it on every rank each step).

    The exit-duration clock runs from ``started_at`` (epoch seconds; default: now), so that start-up
    (model build, checkpoint load) counts against the limit as it counts against the job's."""

    def __init__(self, handle_signals: bool = True, exit_duration_mins: float = 0.0,
                 started_at: float | None = None):
        self.received: str | None = None
        self.started = time.time() if started_at is None else float(started_at)
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
        if self.limit_s and time.time() - self.started >= self.limit_s:
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
