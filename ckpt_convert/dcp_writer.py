"""Streaming writer of a PyTorch DCP directory (the tensor part of a megatron ``torch_dist`` checkpoint).

Tensors arrive as chunks (a whole tensor, one expert of a stacked tensor, a row range); each chunk
is ``torch.save``d at the end of the current ``__0_K.distcp`` file and indexed by its global offset,
exactly as DCP's FileSystemWriter stores items, so DCP / megatron-core load it under any sharding.
Byte objects (megatron ShardedObjects such as ``_extra_state``) are stored verbatim.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Optional, Sequence

import torch

from ckpt_convert import ConversionError


class DCPWriter:
    """Append chunks / byte objects, then :meth:`finish` writes ``.metadata``."""

    def __init__(self, out_dir: str, max_file_bytes: int = 2 * 10**9, progress=None):
        self.out_dir = out_dir
        self.max_file_bytes = max_file_bytes
        self.progress = progress
        self._file_index = -1
        self._fh = None
        self._tensors: dict = {}
        self._objects: set[str] = set()
        self._storage: dict = {}

    def _stream(self):
        if self._fh is None or self._fh.tell() >= self.max_file_bytes:
            if self._fh is not None:
                self._fh.close()
            self._file_index += 1
            self._fh = open(os.path.join(self.out_dir, self._name()), "wb")
        return self._fh

    def _name(self) -> str:
        return f"__0_{self._file_index}.distcp"

    def _append(self, payload: bytes):
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        fh = self._stream()
        offset = fh.tell()
        fh.write(payload)
        return _StorageInfo(relative_path=self._name(), offset=offset, length=len(payload))

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
        md = self._tensors.get(key)
        if md is None:
            md = TensorStorageMetadata(properties=TensorProperties(dtype=chunk.dtype), size=global_shape,
                                       chunks=[])
            self._tensors[key] = md
        elif md.size != global_shape or md.properties.dtype != chunk.dtype:
            raise ConversionError(f"'{key}': chunks disagree on shape/dtype")
        buf = io.BytesIO()
        torch.save(chunk.detach().contiguous().clone(), buf)
        info = self._append(buf.getvalue())
        md.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape))
        self._storage[MetadataIndex(fqn=key, offset=offsets)] = info
        if self.progress is not None:
            self.progress.update(chunk.numel() * chunk.element_size())

    def add_bytes(self, key: str, payload: bytes) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if key in self._objects:
            raise ConversionError(f"object '{key}' written twice")
        self._objects.add(key)
        self._storage[MetadataIndex(fqn=key)] = self._append(payload)

    def finish(self, planner_data: Optional[dict] = None) -> None:
        """Check every tensor is fully covered, then write the DCP index ``.metadata``."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

        for key, md in self._tensors.items():
            covered = sum(int(torch.Size(c.sizes).numel()) for c in md.chunks)
            if covered != md.size.numel():
                raise ConversionError(f"'{key}': chunks cover {covered} of {md.size.numel()} elements")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        state = dict(self._tensors)
        state.update({k: BytesStorageMetadata() for k in self._objects})
        metadata = Metadata(state_dict_metadata=state, planner_data=planner_data,
                            storage_data=self._storage)
        with open(os.path.join(self.out_dir, ".metadata"), "wb") as f:
            pickle.dump(metadata, f)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
