"""Streaming writer of sharded safetensors files plus ``model.safetensors.index.json``.

The caller declares every tensor (name, shape, dtype) up front; the writer assigns them to shards of
at most ``max_shard_bytes`` and writes each shard's header first, then streams tensor bytes in the
declared order as they arrive. Only the tensor being written is in memory.

:func:`write_parallel` does the same with ``workers`` threads: since every tensor's file and byte
offset are fixed by the declaration, each thread produces one tensor and ``pwrite``s it at its place
(file reads, ``pwrite`` and torch copies release the GIL). Memory: ``workers`` tensors at a time.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ckpt_convert import ConversionError, tensor_nbytes
from ckpt_convert.file_io import pwrite_fully, tensor_bytes

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
    _DTYPES[torch.float8_e5m2] = "F8_E5M2"

INDEX_NAME = "model.safetensors.index.json"
# LongCat-Flash-Lite's released layout keeps the MTP tensors in this file, outside the index
# (transformers ignores ``model.mtp.*`` on load; ckpt_convert.hf_reader reads it).
AUXILIARY_NAME = "model-auxiliary.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class FileBytes:
    """A tensor's bytes as they already lie in files: ``(path, offset, length)`` runs, in order.
    :meth:`ShardedSafetensorsWriter.write_parallel` copies them file to file (``copy_file_range``:
    no pass through this process's memory)."""

    runs: tuple[tuple[str, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.runs)


class _Zeros:
    def __repr__(self) -> str:
        return "ZEROS"


# ``produce`` may return this for an all-zero tensor: write_parallel pre-sizes every shard file (its
# unwritten bytes read as zeros), so nothing is written for it.
ZEROS = _Zeros()

_copy_file_range = getattr(os, "copy_file_range", None)
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM,
                       errno.ETXTBSY)
_COPY_BLOCK = 16 << 20


def copy_range(src: str, dst_fd: int, src_offset: int, length: int, dst_offset: int) -> None:
    """Copy ``length`` bytes at ``src_offset`` of file ``src`` to ``dst_offset`` of ``dst_fd``: with
    ``os.copy_file_range`` (in-kernel, GIL released) where the file systems allow it, else
    ``pread``/``pwrite`` through a 16 MB buffer."""
    global _copy_file_range
    fd = os.open(src, os.O_RDONLY)
    buf = None
    try:
        while length:
            n = 0
            if _copy_file_range is not None:
                try:
                    n = _copy_file_range(fd, dst_fd, min(length, 1 << 30), src_offset, dst_offset)
                except OSError as e:
                    if e.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    _copy_file_range = None  # not on these file systems: plain reads and writes
                    continue
            else:
                if buf is None:
                    buf = memoryview(bytearray(min(length, _COPY_BLOCK)))
                n = os.preadv(fd, [buf[:min(length, len(buf))]], src_offset)
                if n > 0:
                    pwrite_fully(dst_fd, buf[:n], dst_offset)
            if n <= 0:
                raise ConversionError(f"'{src}' ends at byte {src_offset}, inside the tensor data")
            length, src_offset, dst_offset = length - n, src_offset + n, dst_offset + n
    finally:
        os.close(fd)


def parse_size(text: str) -> int:
    """``'5GB'`` / ``'500MB'`` / ``'1024'`` -> bytes (decimal units, like transformers)."""
    t = str(text).strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def _shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedSafetensorsWriter:
    """Write declared tensors, in declared order, into ``out_dir`` as sharded safetensors.

    ``auxiliary`` names tensors that go to :data:`AUXILIARY_NAME` (not in the index); they must be
    declared after all others."""

    def __init__(self, out_dir: str, specs: Sequence[TensorSpec], max_shard_bytes: int = 5 * 10**9,
                 progress=None, auxiliary: Sequence[str] = ()):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise ConversionError(f"tensor '{dup}' is declared twice")
        for s in specs:
            if s.dtype not in _DTYPES:
                raise ConversionError(f"tensor '{s.name}': dtype {s.dtype} cannot be stored in safetensors")
        self.out_dir = out_dir
        aux = set(auxiliary)
        main = [s for s in specs if s.name not in aux]
        if [s.name for s in specs] != [s.name for s in main] + [s.name for s in specs if s.name in aux]:
            raise ConversionError("auxiliary tensors must be declared after all the others")
        self.shards = _shard_plan(main, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if aux:
            self.shards.append([s for s in specs if s.name in aux])
            self.files.append(AUXILIARY_NAME)
        self._indexed = n
        self._order = [(si, spec) for si, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0
        self._fh = None
        self._shard = -1
        self.progress = progress
        self.total_bytes = sum(s.nbytes for s in specs)

    def _header(self, si: int) -> bytes:
        """Shard ``si``'s 8-byte length + JSON header (padded to 8 bytes)."""
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[si]:
            header[spec.name] = {
                "dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _open_shard(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(os.path.join(self.out_dir, self.files[si]), "wb")
        self._fh.write(self._header(si))
        self._shard = si

    def write_parallel(self, produce: Callable[[str], torch.Tensor], workers: int = 1) -> str:
        """Write every declared tensor, ``produce(name)`` giving its data, on ``workers`` threads;
        then the index (returns its path). At most ``workers`` produced tensors are alive at once.

        ``produce`` returns a tensor, a :class:`FileBytes` (copied file to file, never in memory) or
        :data:`ZEROS` (nothing written: the pre-sized shard files read as zeros)."""
        if self._pos:
            raise ConversionError("write_parallel after write(): use one or the other")
        places = []  # (fd index, absolute offset, spec)
        fds = []
        try:
            for si, shard in enumerate(self.shards):
                header = self._header(si)
                fd = os.open(os.path.join(self.out_dir, self.files[si]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o644)
                fds.append(fd)
                pwrite_fully(fd, memoryview(header), 0)
                offset = len(header)
                for spec in shard:
                    places.append((si, offset, spec))
                    offset += spec.nbytes
                os.ftruncate(fd, offset)
            lock = threading.Lock()

            def one(place) -> None:
                si, offset, spec = place
                data = produce(spec.name)
                if data is ZEROS:
                    pass  # the pre-sized file already reads as zeros there
                elif isinstance(data, FileBytes):
                    if data.nbytes != spec.nbytes:
                        raise ConversionError(f"tensor '{spec.name}': {data.nbytes} bytes in the source "
                                              f"files, declared {spec.shape} {spec.dtype} ({spec.nbytes})")
                    for path, src_offset, length in data.runs:
                        copy_range(path, fds[si], src_offset, length, offset)
                        offset += length
                else:
                    self._check(spec, spec.name, data)
                    pwrite_fully(fds[si], tensor_bytes(data), offset)
                del data
                if self.progress is not None:
                    with lock:
                        self.progress.update(spec.nbytes)

            if workers <= 1:
                for place in places:
                    one(place)
            else:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="to_hf") as pool:
                    for _ in pool.map(one, places):  # re-raises the first failure
                        pass
        finally:
            for fd in fds:
                os.close(fd)
        self._pos = len(self._order)
        return self.finish()

    @staticmethod
    def _check(spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ConversionError(
                f"tensor '{name}': got {tuple(tensor.shape)} {tensor.dtype}, declared {spec.shape} {spec.dtype}"
            )

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next declared one, with the declared shape/dtype."""
        if self._pos >= len(self._order):
            raise ConversionError(f"tensor '{name}' was not declared (all declared tensors are written)")
        si, spec = self._order[self._pos]
        if name != spec.name:
            raise ConversionError(f"expected tensor '{spec.name}' next, got '{name}'")
        self._check(spec, name, tensor)
        if si != self._shard:
            self._open_shard(si)
        self._fh.write(tensor_bytes(tensor))
        self._pos += 1
        if self.progress is not None:
            self.progress.update(spec.nbytes)

    def finish(self) -> str:
        """Close the last shard and write ``model.safetensors.index.json``; return its path."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1].name
            raise ConversionError(f"tensor '{missing}' was declared but never written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self._order:
            raise ConversionError("no tensors to write")
        indexed = [(si, spec) for si, spec in self._order if si < self._indexed]
        index = {
            "metadata": {"total_size": sum(spec.nbytes for _, spec in indexed)},
            "weight_map": {spec.name: self.files[si] for si, spec in indexed},
        }
        path = os.path.join(self.out_dir, INDEX_NAME)
        with open(path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return path

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
