"""Streaming writer of a PyTorch DCP directory (the tensor part of a megatron ``torch_dist`` checkpoint).

Tensors arrive as chunks (a whole tensor, one expert of a stacked tensor, a row range); each chunk
is ``torch.save``d at the end of the calling thread's current ``__T_K.distcp`` file and indexed by
its global offset, exactly as DCP's FileSystemWriter stores items, so DCP / megatron-core load it
under any sharding. Byte objects (megatron ShardedObjects such as ``_extra_state``) are stored
verbatim. Several threads may add chunks at once (each writes its own files; the index is shared
under a lock), which is how ``from_hf --workers`` reads and writes in parallel.

:func:`zip_crc32_off`: ``torch.save`` computes a CRC-32 of every tensor for its zip records, a pass
over the data that cost about half of ``from_hf``'s time; ``torch.load`` (and so DCP and
megatron-core) never checks it (a flipped data byte loads silently), so the streaming import turns it
off while it writes. Every ``.distcp`` file is hashed (SHA-256) as it is written, for the
checkpoint's ``checksums.json`` (``write_manifest``), which training verifies on load.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from typing import Callable, Iterator, Optional, Sequence

import torch

from ckpt_convert import ConversionError
from longcat_megatron.training.checkpoint_integrity import open_digesting


@contextlib.contextmanager
def zip_crc32_off() -> Iterator[None]:
    """``torch.save`` without the zip records' CRC-32 inside this block (process-wide setting: enter
    it from one thread, around all the writing threads)."""
    from torch.utils.serialization import config

    if not hasattr(config.save, "compute_crc32"):   # older torch: nothing to switch
        yield
        return
    with config.patch({"save.compute_crc32": False}):
        yield


class DCPWriter:
    """Append chunks / byte objects, then :meth:`finish` writes ``.metadata``."""

    def __init__(self, out_dir: str, max_file_bytes: int = 2 * 10**9, progress=None):
        self.out_dir = out_dir
        self.max_file_bytes = max_file_bytes
        self.progress = progress
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: writer number, file index, open file
        self._writers = 0
        self._handles: list = []
        self._tensors: dict = {}
        self._objects: dict[str, None] = {}  # insertion order: a reproducible .metadata
        self._storage: dict = {}

    def _stream(self):
        """This thread's open ``__T_K.distcp`` file (a new one once ``max_file_bytes`` is reached)."""
        local = self._local
        if not hasattr(local, "writer"):
            with self._lock:
                local.writer, self._writers = self._writers, self._writers + 1
            local.index, local.fh = -1, None
        if local.fh is None or local.fh.closed or local.fh.tell() >= self.max_file_bytes:
            if local.fh is not None:
                local.fh.close()
            local.index += 1
            local.name = f"__{local.writer}_{local.index}.distcp"
            local.fh = open_digesting(os.path.join(self.out_dir, local.name))
            with self._lock:
                self._handles.append(local.fh)
        return local.fh, local.name

    def _append(self, payload):
        """Write ``payload`` (bytes, or a function writing into the file) at the end of this thread's
        file; its storage info."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        fh, name = self._stream()
        offset = fh.tell()
        if callable(payload):
            payload(fh)
        else:
            fh.write(payload)
        return _StorageInfo(relative_path=name, offset=offset, length=fh.tell() - offset)

    def add_chunk(self, key: str, global_shape: Sequence[int], offsets: Sequence[int],
                  chunk: torch.Tensor) -> None:
        """Store ``chunk`` as the region at ``offsets`` of tensor ``key`` (global ``global_shape``)."""
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata)

        global_shape, offsets = torch.Size(global_shape), torch.Size(offsets)
        if len(offsets) != len(global_shape) or chunk.dim() != len(global_shape):
            raise ConversionError(f"'{key}': chunk of rank {chunk.dim()} for a tensor of shape {tuple(global_shape)}")
        if any(o + s > n for o, s, n in zip(offsets, chunk.shape, global_shape)):
            raise ConversionError(f"'{key}': chunk {tuple(chunk.shape)} at {tuple(offsets)} exceeds {tuple(global_shape)}")
        with self._lock:
            md = self._tensors.get(key)
            if md is None:
                md = TensorStorageMetadata(properties=TensorProperties(dtype=chunk.dtype), size=global_shape,
                                           chunks=[])
                self._tensors[key] = md
            elif md.size != global_shape or md.properties.dtype != chunk.dtype:
                raise ConversionError(f"'{key}': chunks disagree on shape/dtype")
        data = chunk.detach().contiguous()
        if data.untyped_storage().nbytes() != data.numel() * data.element_size():
            data = data.clone()  # torch.save writes the whole storage of a view
        info = self._append(lambda fh: torch.save(data, fh))
        with self._lock:
            md.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape))
            self._storage[MetadataIndex(fqn=key, offset=offsets)] = info
        if self.progress is not None:
            with self._lock:
                self.progress.update(chunk.numel() * chunk.element_size())

    def tensor_keys(self) -> list[str]:
        """The tensors added so far."""
        with self._lock:
            return list(self._tensors)

    def add_bytes(self, key: str, payload: bytes) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        with self._lock:
            if key in self._objects:
                raise ConversionError(f"object '{key}' written twice")
            self._objects[key] = None
        info = self._append(payload)
        with self._lock:
            self._storage[MetadataIndex(fqn=key)] = info

    def finish(self, planner_data: Optional[dict] = None) -> None:
        """Check every tensor is fully covered, then write the DCP index ``.metadata``."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

        for key, md in self._tensors.items():
            covered = sum(int(torch.Size(c.sizes).numel()) for c in md.chunks)
            if covered != md.size.numel():
                raise ConversionError(f"'{key}': chunks cover {covered} of {md.size.numel()} elements")
        self.close()
        state = dict(self._tensors)
        state.update({k: BytesStorageMetadata() for k in self._objects})
        metadata = Metadata(state_dict_metadata=state, planner_data=planner_data,
                            storage_data=self._storage)
        with open(os.path.join(self.out_dir, ".metadata"), "wb") as f:
            pickle.dump(metadata, f)

    def close(self) -> None:
        """Close every thread's file (call after all threads are done)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for fh in handles:
            fh.close()


def run_tasks(tasks: Sequence[Callable[[], None]], workers: int = 1) -> None:
    """Run chunk-writing ``tasks`` (each reads one piece and adds it to a :class:`DCPWriter`) on
    ``workers`` threads with the zip CRC-32 off; re-raises the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    with zip_crc32_off():
        if workers <= 1:
            for task in tasks:
                task()
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dcp_writer") as pool:
            for _ in pool.map(lambda task: task(), tasks):  # re-raises the first failure
                pass


def commit_checkpoint(root: str, iteration: int, run_cfg) -> None:
    """Finish an offline-written ``root/iter_N`` the way a training save commits: its
    ``run_config.yaml``, ``checksums.json`` from the digests the writer took (training verifies it),
    then the tracker naming it. ``root`` is an ``atomic_output_dir``, whose rename publishes it."""
    from ckpt_convert.dcp_reader import TRACKER
    from longcat_megatron.config import save_config
    from longcat_megatron.training.checkpoint_integrity import write_manifest

    path = os.path.join(root, f"iter_{iteration:07d}")
    save_config(run_cfg, os.path.join(path, "run_config.yaml"))
    write_manifest(path)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(f"{iteration}\n")
