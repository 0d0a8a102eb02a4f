"""All-or-nothing output directories: write into a temporary sibling, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from ckpt_convert import ConversionError


@contextlib.contextmanager
def atomic_output_dir(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to ``final``; rename it to ``final`` on success.

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
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
