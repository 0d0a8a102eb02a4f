"""Hang watchdog: a rank on which no training step completes within ``train.hang_timeout_mins``
dumps the Python stacks of all its threads (faulthandler) into the log directory and exits with
:data:`EXIT_HANG` (76), which launch/common.sh requeues like a crash (``MAX_CRASH_REQUEUES``).

Every rank runs its own watchdog; in a hung collective all ranks stop completing steps, so each one
fires (within about one step time of the first) and leaves ``hang-stacks-rank{R}.txt``. The clock
restarts after every step, evaluation and checkpoint save, so the timeout must exceed the longest
single step, evaluation or save; start-up (model build, checkpoint load) is not watched.

The watchdog is a Python thread, so it needs the GIL; a main thread stuck in a C call that holds the
GIL would silence it. A backstop that needs no GIL covers that case: faulthandler's own timer
(``dump_traceback_later``), re-armed at every beat to fire a minute (or half the timeout) later than
the thread; it writes the same stacks file and ends the process with exit code 1 (a crash to the
launcher, which requeues it the same way).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import socket
import sys
import threading
import time
from typing import Optional

from longcat_megatron.training.faults import record_failure

# Exit code of a rank that the watchdog ended: "hung: requeue me" (distinct from 75 = saved and stopped).
EXIT_HANG = 76


def stacks_path(dump_dir: str, rank: int) -> str:
    return os.path.join(dump_dir, f"hang-stacks-rank{rank:05d}.txt")


class HangWatchdog:
    """Background thread; call :meth:`beat` after each completed step (and after saves)."""

    def __init__(self, timeout_mins: float, dump_dir: str, rank: int, backstop_grace_s: Optional[float] = None):
        self.timeout_s = float(timeout_mins) * 60.0
        # the GIL-free backstop fires this much later than the thread
        self.backstop_grace_s = max(60.0, self.timeout_s / 2) if backstop_grace_s is None else backstop_grace_s
        self.dump_dir = dump_dir
        self.rank = rank
        self.iteration: Optional[int] = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._backstop = None  # the open stacks file faulthandler's timer writes to

    def start(self, iteration: int) -> "HangWatchdog":
        if self.timeout_s > 0:
            try:
                os.makedirs(self.dump_dir, exist_ok=True)
                # append: a requeued run keeps the stacks of the hang that caused the requeue
                self._backstop = open(stacks_path(self.dump_dir, self.rank), "a")
            except OSError:
                self._backstop = None
            atexit.register(self.stop)  # also after an uncaught exception: no empty stacks file left
            self.beat(iteration)
            self._thread = threading.Thread(target=self._watch, name="longcat-hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, iteration: Optional[int] = None) -> None:
        if iteration is not None:
            self.iteration = iteration
        self._last = time.monotonic()
        if self._backstop is not None:
            faulthandler.dump_traceback_later(self.timeout_s + self.backstop_grace_s,
                                              file=self._backstop, exit=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._backstop is not None:
            faulthandler.cancel_dump_traceback_later()
            path = self._backstop.name
            self._backstop.close()
            self._backstop = None
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                os.remove(path)

    def _watch(self) -> None:
        poll = min(5.0, max(self.timeout_s / 10.0, 0.05))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        faulthandler.cancel_dump_traceback_later()
        path = stacks_path(self.dump_dir, self.rank)
        what = (f"no training step completed for {idle:.0f} s (train.hang_timeout_mins="
                f"{self.timeout_s / 60:g}); last completed iteration {self.iteration}")
        try:
            os.makedirs(self.dump_dir, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"rank {self.rank} pid {os.getpid()} host {socket.gethostname()} "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {what}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            path = f"(not written: {e})"
        record_failure(f"hang: no step completed within train.hang_timeout_mins={self.timeout_s / 60:g}")
        print(f"[watchdog] rank {self.rank}: {what}; Python stacks -> {path}; exiting with "
              f"{EXIT_HANG} (requeue)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_HANG)
