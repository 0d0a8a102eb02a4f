"""Read a megatron-core ``torch_dist`` checkpoint on one CPU process, one tensor slice at a time.

A ``torch_dist`` checkpoint is a PyTorch DCP directory (``.metadata`` + ``__R_I.distcp`` shards +
``metadata.json`` + ``common.pt``). The DCP metadata records every tensor's *global* shape and where
each saved chunk lives (file, byte offset, length), whatever TP/PP/EP/DP layout wrote it. So a
single process can assemble any region of any tensor by reading just the chunks that overlap it,
with no process group at all.

megatron-core stacks homogeneous layers (and the experts of a layer) along leading axes: e.g.
``decoder.layers.self_attention.linear_proj.weight`` has shape ``[num_layers, H, heads*dv]`` and
``decoder.layers.mlp.experts.experts.linear_fc1.weight`` ``[num_layers, E, 2*I, H]``.
:meth:`TorchDistReader.read` takes an ``index`` over those leading axes so that peak memory is one
layer's (one expert's) slice, never the stacked tensor.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ckpt_convert import ConversionError, tensor_nbytes
from ckpt_convert.file_io import pread_fully, tensor_bytes

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d+)$")
# DCP keys that are not model weights (optimizer state, RNG, scheduler objects ...).
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine")


@dataclass(frozen=True)
class TensorInfo:
    """Global shape and dtype of one checkpoint tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` of file ``path`` that are the bytes ``[dest, dest+length)`` of a
    region (C order), stored raw (no header, no transform)."""

    path: str
    offset: int
    length: int
    dest: int


# A region made of more raw runs than this is read the generic (DCP) way instead.
MAX_RUNS = 4096


class _FileSlice(io.RawIOBase):
    """Read-only, seekable view of ``length`` bytes at ``offset`` of an open fd (``os.pread``)."""

    def __init__(self, fd: int, offset: int, length: int):
        self._fd, self._base, self._len, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def list_iterations(root: str) -> list[int]:
    """Iterations present as ``iter_*`` sub-directories of ``root``."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m)


def resolve_checkpoint_dir(load: str, iteration: Optional[int] = None) -> tuple[str, Optional[int]]:
    """The ``iter_*`` directory to read from a training ``--save`` root (or an iteration dir itself).

    Without ``iteration`` the tracker file (``latest_checkpointed_iteration.txt``) decides.
    Raises :class:`ConversionError` naming what is missing and what exists instead.
    """
    if not os.path.isdir(load):
        raise ConversionError(f"checkpoint directory '{load}' does not exist")
    if os.path.isfile(os.path.join(load, "metadata.json")) and iteration is None:
        m = _ITER_RE.match(os.path.basename(os.path.normpath(load)))
        return load, int(m.group(1)) if m else None
    available = list_iterations(load)
    if iteration is None:
        tracker = os.path.join(load, TRACKER)
        if not os.path.isfile(tracker):
            raise ConversionError(
                f"'{load}' has no {TRACKER} (no committed checkpoint) and is not an iteration "
                f"directory; available iterations: {available or 'none'} (pass --iteration N)"
            )
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise ConversionError(f"{tracker} holds {text!r}, not an iteration number")
        iteration = int(text)
    path = os.path.join(load, f"iter_{iteration:07d}")
    if not os.path.isdir(path):
        raise ConversionError(
            f"iteration {iteration} does not exist in '{load}' (no {os.path.basename(path)}); "
            f"available iterations: {available or 'none'}"
        )
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ConversionError(
            f"'{path}' has no metadata.json: not a finished megatron-core dist checkpoint "
            "(a save interrupted before commit?)"
        )
    return path, iteration


class _RegionPlanner:
    """Minimal DCP LoadPlanner: fill ``dest`` with the region ``offsets``/``dest.shape`` of ``key``."""

    def __init__(self, key: str, md, offsets: Sequence[int], dest: torch.Tensor):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        self.dest = dest
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
        self.plan = LoadPlan(create_read_items_for_chunk_list(key, md, [chunk]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.dest
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover - tensors only
        raise ConversionError(f"{read_item.dest_index.fqn} is not a tensor")


class TorchDistReader:
    """Random access to the tensors of one ``torch_dist`` checkpoint directory (no process group)."""

    def __init__(self, path: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        meta_json = os.path.join(path, "metadata.json")
        if not os.path.isfile(meta_json):
            raise ConversionError(f"'{path}' has no metadata.json: not a megatron-core dist checkpoint")
        backend = json.load(open(meta_json)).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(
                f"{meta_json}: sharded_backend={backend!r}; only 'torch_dist' checkpoints are supported"
            )
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ConversionError(f"'{path}' has no .metadata file (DCP index); the checkpoint is incomplete")
        self._reader = FileSystemReader(path)
        try:
            self.metadata = self._reader.read_metadata()
        except (EOFError, pickle.UnpicklingError, AttributeError) as e:
            raise ConversionError(f"{os.path.join(path, '.metadata')} is corrupt ({e})") from None
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: dict[str, TensorInfo] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = TensorInfo(key, tuple(md.size), md.properties.dtype)
        self._file_of_key: dict[str, set[str]] = {}
        self._raw: dict = {}  # storage index -> (absolute data offset, chunk shape) or None
        self._object_storage: Optional[dict] = None  # object key -> its storage info (read_bytes)
        self._check_files()

    # ----------------------------------------------------------------------------------- checks
    def _check_files(self) -> None:
        """Every shard file exists and is long enough for the chunks the index places in it."""
        need: dict[str, tuple[int, str]] = {}
        for index, info in self.metadata.storage_data.items():
            end = info.offset + info.length
            self._file_of_key.setdefault(index.fqn, set()).add(info.relative_path)
            if end > need.get(info.relative_path, (0, ""))[0]:
                need[info.relative_path] = (end, index.fqn)
        for rel, (end, key) in sorted(need.items()):
            full = os.path.join(self.path, rel)
            if not os.path.isfile(full):
                raise ConversionError(
                    f"shard file '{full}' is missing (it holds e.g. '{key}'); copy the whole "
                    "checkpoint directory"
                )
            size = os.path.getsize(full)
            if size < end:
                raise ConversionError(
                    f"shard file '{full}' is truncated: {size} bytes, the index needs {end} "
                    f"(key '{key}'); the copy or the save did not finish"
                )

    # ------------------------------------------------------------------------------------ query
    def model_keys(self) -> list[str]:
        """Tensor keys that belong to the model (optimizer/RNG entries left out)."""
        return [k for k in self.tensors if not k.startswith(NON_MODEL_PREFIXES)]

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise ConversionError(f"key '{key}' is not a tensor in checkpoint '{self.path}'")
        return self.tensors[key]

    def _check_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> TensorInfo:
        info = self.info(key)
        if len(offsets) != len(info.shape) or len(sizes) != len(info.shape):
            raise ValueError(f"{key}: region rank {len(offsets)} != tensor rank {len(info.shape)}")
        for o, s, n in zip(offsets, sizes, info.shape):
            if o < 0 or s < 0 or o + s > n:
                raise ValueError(f"{key}: region {list(offsets)}+{list(sizes)} outside {list(info.shape)}")
        return info

    def _plan(self, key: str, offsets: Sequence[int], sizes: Sequence[int], dest: torch.Tensor) -> _RegionPlanner:
        planner = _RegionPlanner(key, self.metadata.state_dict_metadata[key], offsets, dest)
        covered = sum(_numel(item.lengths) for item in planner.plan.items)
        if covered != dest.numel():
            raise ConversionError(
                f"checkpoint '{self.path}': key '{key}' region {list(offsets)}+{list(sizes)} is only "
                f"partly saved ({covered} of {dest.numel()} elements); the checkpoint is incomplete"
            )
        return planner

    def _raw_chunk(self, storage_index, dtype: torch.dtype):
        """``(absolute byte offset in the file, chunk shape)`` of a stored chunk whose bytes lie in
        its file as one plain C-order run (DCP stores each chunk as a ``torch.save`` zip with the data
        uncompressed); ``None`` when that cannot be established (then the DCP path reads it)."""
        if storage_index in self._raw:
            return self._raw[storage_index]
        raw = None
        sinfo = self.metadata.storage_data[storage_index]
        if not sinfo.transform_descriptors and sys.byteorder == "little":
            path = os.path.join(self.path, sinfo.relative_path)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    meta = torch.load(_FileSlice(fd, sinfo.offset, sinfo.length), map_location="meta",
                                      weights_only=True)
                finally:
                    os.close(fd)
                storage = meta.untyped_storage()
                start = getattr(storage, "_checkpoint_offset", None)
                nbytes = meta.numel() * meta.element_size()
                if (isinstance(meta, torch.Tensor) and meta.dtype == dtype and meta.is_contiguous()
                        and isinstance(start, int) and start >= 0):
                    begin = start + meta.storage_offset() * meta.element_size()
                    if begin + nbytes <= storage.nbytes() + start and begin + nbytes <= sinfo.length:
                        raw = (sinfo.offset + begin, tuple(meta.shape))
            except Exception:  # noqa: BLE001 - anything unusual: the generic path reads (and reports) it
                raw = None
        self._raw[storage_index] = raw
        return raw

    def region_extents(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> Optional[list[Extent]]:
        """The region ``[offsets, offsets+sizes)`` of ``key`` as raw byte runs of the shard files,
        in region order and covering it exactly; ``None`` when some chunk is not stored raw or the
        region would take more than :data:`MAX_RUNS` runs (read it with :meth:`read_region`)."""
        info = self._check_region(key, offsets, sizes)
        dest = torch.empty(tuple(sizes), dtype=info.dtype, device="meta")
        planner = self._plan(key, offsets, sizes, dest)
        esize = dest.element_size()
        dstride = _strides(sizes)
        out: list[Extent] = []
        for item in planner.plan.items:
            raw = self._raw_chunk(item.storage_index, info.dtype)
            if raw is None:
                return None
            base, cshape = raw
            cstride = _strides(cshape)
            lengths = list(item.lengths)
            so, do = list(item.storage_offsets), list(item.dest_offsets)
            if len(cshape) != len(lengths) or any(o + n > c for o, n, c in zip(so, lengths, cshape)):
                return None
            # Merge the trailing dims that both sides hold whole into one contiguous run.
            d, run = len(lengths) - 1, 1
            while d >= 0:
                run *= lengths[d]
                if not (lengths[d] == cshape[d] == sizes[d]):
                    break
                d -= 1
            outer = lengths[:max(d, 0)]
            if _numel(outer) > MAX_RUNS:
                return None
            path = os.path.join(self.path, self.metadata.storage_data[item.storage_index].relative_path)
            for idx in itertools.product(*(range(n) for n in outer)):
                pad = list(idx) + [0] * (len(lengths) - len(idx))
                src = sum((o + i) * st for o, i, st in zip(so, pad, cstride))
                dst = sum((o + i) * st for o, i, st in zip(do, pad, dstride))
                out.append(Extent(path, base + src * esize, run * esize, dst * esize))
            if len(out) > MAX_RUNS:
                return None
        out.sort(key=lambda e: e.dest)
        pos = 0
        for e in out:
            if e.dest != pos:
                return None
            pos += e.length
        if pos != dest.numel() * esize:
            return None
        return _merge(out)

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region ``[offsets, offsets+sizes)`` of the global tensor ``key`` (CPU, saved dtype).

        Chunks stored raw are read with ``os.preadv`` straight into the result (one copy, the GIL
        released); anything else goes through DCP's reader (``torch.load`` per chunk, then a copy)."""
        info = self._check_region(key, offsets, sizes)
        extents = self.region_extents(key, offsets, sizes)
        dest = torch.empty(tuple(sizes), dtype=info.dtype)
        if extents is not None:
            try:
                read_extents(extents, dest)
                return dest
            except OSError as e:
                raise ConversionError(f"cannot read key '{key}' from {self.path}: {e}") from None
        planner = self._plan(key, offsets, sizes, dest)
        plan = self._reader.prepare_local_plan(planner.plan)
        try:
            self._reader.read_data(plan, planner).wait()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.load / IO errors carry no file or key
            files = ", ".join(sorted(self._file_of_key.get(key, ())))
            raise ConversionError(
                f"cannot read key '{key}' from {self.path}/{{{files}}}: {type(e).__name__}: {e}"
            ) from None
        return dest

    def read(self, key: str, index: Sequence[int] = ()) -> torch.Tensor:
        """Tensor ``key``, or its sub-tensor ``t[index]`` over the leading (stacked) axes."""
        shape = self.info(key).shape
        if len(index) > len(shape):
            raise ValueError(f"{key}: index {tuple(index)} has more axes than shape {shape}")
        for i, n in zip(index, shape):
            if not 0 <= i < n:
                raise ValueError(f"{key}: index {tuple(index)} out of range for shape {shape}")
        offsets = list(index) + [0] * (len(shape) - len(index))
        sizes = [1] * len(index) + list(shape[len(index):])
        return self.read_region(key, offsets, sizes).reshape(shape[len(index):])

    def objects(self) -> list[str]:
        """Keys of the byte objects (megatron ShardedObjects: ``_extra_state``, RNG state ...)."""
        return [k for k in self.metadata.state_dict_metadata if k not in self.tensors]

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes of object ``key`` (verbatim)."""
        if self._object_storage is None:  # one pass over the index, not one per object
            self._object_storage = {index.fqn: info for index, info in self.metadata.storage_data.items()
                                    if index.fqn not in self.tensors}
        info = self._object_storage.get(key)
        if info is None:
            raise ConversionError(f"object '{key}' is not in checkpoint '{self.path}'")
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def iter_tensors(self, keys: Optional[Sequence[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, full tensor)`` one at a time (for small checkpoints and tests)."""
        for key in keys if keys is not None else self.model_keys():
            yield key, self.read(key)


def _strides(shape) -> list[int]:
    """C-order element strides of ``shape``."""
    out, acc = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        out[i] = acc
        acc *= shape[i]
    return out


def _merge(extents: list[Extent]) -> list[Extent]:
    """Join runs that continue each other in the same file."""
    out: list[Extent] = []
    for e in extents:
        last = out[-1] if out else None
        if last is not None and last.path == e.path and last.offset + last.length == e.offset:
            out[-1] = Extent(last.path, last.offset, last.length + e.length, last.dest)
        else:
            out.append(e)
    return out


def read_extents(extents: Sequence[Extent], dest: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``dest`` from ``extents`` (``os.preadv``; raises OSError on a
    short file)."""
    buf = tensor_bytes(dest)
    fds: dict[str, int] = {}
    try:
        for e in extents:
            fd = fds.get(e.path)
            if fd is None:
                fd = fds[e.path] = os.open(e.path, os.O_RDONLY)
            if not pread_fully(fd, buf[e.dest:e.dest + e.length], e.offset):
                raise OSError(f"'{e.path}' ends inside the data at bytes {e.offset}..{e.offset + e.length}")
    finally:
        for fd in fds.values():
            os.close(fd)


def _numel(lengths) -> int:
    n = 1
    for s in lengths:
        n *= s
    return n
