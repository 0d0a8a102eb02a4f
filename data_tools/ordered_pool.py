"""Ordered parallel map with a bounded number of tasks in flight and prompt worker-death detection.

``multiprocessing.Pool`` reads its whole input ahead (``imap``) and hangs forever when a worker is
killed (e.g. by the out-of-memory killer). :class:`OrderedPool` keeps at most ``window`` tasks
submitted to a spawn-context ``ProcessPoolExecutor``, yields results in input order, and turns a dead
worker into :class:`WorkerDiedError` within about a second (the executor watches the worker
processes). ``workers=0`` runs everything in the calling process (debugging, tiny inputs).
Workers ignore SIGINT: Ctrl-C is handled once, by the parent, which then stops them. A SIGINT or
SIGTERM that arrives while ``submit`` is starting a worker is held until the start is complete: an
interrupted start leaves a child that ``close`` cannot see, which would print an EOFError traceback
when the parent is gone.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

from longcat_megatron.errors import UserInputError


class WorkerDiedError(UserInputError):
    """A worker process died (killed by a signal, out of memory, ...); nothing was written."""


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM (those with Python-level handling) until the block ends, then act on
    the first one held, as its handler would have (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signum, frame = held[0]
            previous[signum](signum, frame)


def _init(initializer: Callable, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)


class OrderedPool:
    """``workers`` spawn-context processes, each set up by ``initializer(*initargs)``."""

    def __init__(self, workers: int, initializer: Callable, initargs: tuple):
        self.workers = max(0, int(workers))
        self._executor = None
        self._processes: dict = {}
        if self.workers == 0:
            initializer(*initargs)
        else:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                 initializer=_init, initargs=(initializer, initargs))

    def map(self, fn: Callable, items: Iterable, window: int) -> Iterator:
        """``fn(item)`` for each item, computed by the workers, yielded in input order."""
        if self._executor is None:
            yield from map(fn, items)
            return
        in_flight: collections.deque = collections.deque()
        try:
            for item in items:
                with _stop_signals_held():          # submit may be starting a worker process
                    in_flight.append(self._executor.submit(fn, item))
                self._processes.update(getattr(self._executor, "_processes", None) or {})
                if len(in_flight) >= max(1, window):
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        except BrokenProcessPool:
            raise self._died() from None

    def _died(self) -> WorkerDiedError:
        for p in self._processes.values():
            p.join(timeout=1)
        codes = sorted({p.exitcode for p in self._processes.values() if p.exitcode not in (None, 0)})
        how = ", ".join(_describe_exit(c) for c in codes) or "it exited unexpectedly"
        return WorkerDiedError(
            f"a worker process died ({how}); the run stopped and wrote nothing. A SIGKILL usually "
            "means the out-of-memory killer: re-run with fewer --workers (or a smaller --chunk-mb)."
        )

    def close(self) -> None:
        """Stop the workers now (running tasks are abandoned)."""
        if self._executor is None:
            return
        # (a stop cannot land inside submit's worker start: map holds it until the start is done,
        # so the executor has recorded every worker)
        self._processes.update(getattr(self._executor, "_processes", None) or {})
        for p in self._processes.values():
            if p.is_alive():
                p.terminate()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for p in self._processes.values():
            p.join(timeout=5)
        self._executor = None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
