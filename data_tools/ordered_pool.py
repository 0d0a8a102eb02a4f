"""Ordered parallel map with a bounded number of tasks in flight (memory does not grow with input).

``multiprocessing.Pool.imap`` reads its whole input ahead of the workers; this keeps at most
``window`` tasks submitted and yields results in input order.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
from typing import Callable, Iterable, Iterator


def make_pool(workers: int, initializer: Callable, initargs: tuple):
    """A spawn-context pool (workers never inherit the parent's tokenizer threads or state)."""
    return mp.get_context("spawn").Pool(max(1, workers), initializer=initializer, initargs=initargs)


def ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn(item)`` for each item, computed in ``pool``, yielded in input order."""
    in_flight: collections.deque = collections.deque()
    for item in items:
        in_flight.append(pool.apply_async(fn, (item,)))
        if len(in_flight) >= window:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()
