"""Byte-level file I/O into and out of tensor memory (no intermediate copies; the GIL is released).

Both converters move tensor bytes with positional reads and writes (``os.preadv`` / ``os.pwrite``)
so that ``--workers`` threads overlap their I/O on shared files.
"""

from __future__ import annotations

import os

import torch


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat ``memoryview``: no copy (and writable) for a contiguous CPU
    tensor; other tensors are copied to contiguous CPU memory first."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(data.numpy())


def pread_fully(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` with the bytes of ``fd`` from ``offset``; False when the file ends first."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            return False
        view, offset = view[n:], offset + n
    return True


def pwrite_fully(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most ~2 GB on Linux)."""
    data = data.cast("B") if data.format != "B" else data
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
