"""All-or-nothing output directories: write into a temporary sibling, flush it to disk, rename it
when complete (the rename is the commit; without the flush a crash soon after could leave files
that exist under the final name but never reached the disk)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Iterator, Optional

from ckpt_convert import ConversionError


@contextlib.contextmanager
def atomic_output_dir(final: str, overwrite: bool = False,
                      timings: Optional[dict] = None) -> Iterator[str]:
    """Yield a temporary directory next to ``final``; on success fsync its files and directories
    and rename it to ``final`` (``timings["flush_seconds"]``: the time the fsyncs took).

    On any exception the temporary directory is removed, so no partial output is left behind.
    An existing ``final`` is an error unless ``overwrite`` (then it is replaced only at the end).
    """
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise ConversionError(f"output '{final}' already exists; remove it or pass --overwrite")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.partial-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    start = time.perf_counter()
    try:
        flush_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"cannot flush the output to disk ({e}); nothing was written to '{final}'") from None
    if timings is not None:
        timings["flush_seconds"] = time.perf_counter() - start
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def flush_tree(root: str) -> None:
    """fsync every file under ``root``, then the directories (deepest first) so the names persist."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
