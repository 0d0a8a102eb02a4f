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

import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ckpt_convert import ConversionError, tensor_nbytes

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

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region ``[offsets, offsets+sizes)`` of the global tensor ``key`` (CPU, saved dtype)."""
        info = self.info(key)
        if len(offsets) != len(info.shape) or len(sizes) != len(info.shape):
            raise ValueError(f"{key}: region rank {len(offsets)} != tensor rank {len(info.shape)}")
        for o, s, n in zip(offsets, sizes, info.shape):
            if o < 0 or s < 0 or o + s > n:
                raise ValueError(f"{key}: region {list(offsets)}+{list(sizes)} outside {list(info.shape)}")
        dest = torch.empty(tuple(sizes), dtype=info.dtype)
        planner = _RegionPlanner(key, self.metadata.state_dict_metadata[key], offsets, dest)
        covered = sum(_numel(item.lengths) for item in planner.plan.items)
        if covered != dest.numel():
            raise ConversionError(
                f"checkpoint '{self.path}': key '{key}' region {list(offsets)}+{list(sizes)} is only "
                f"partly saved ({covered} of {dest.numel()} elements); the checkpoint is incomplete"
            )
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
        for index, info in self.metadata.storage_data.items():
            if index.fqn == key:
                with open(os.path.join(self.path, info.relative_path), "rb") as f:
                    f.seek(info.offset)
                    return f.read(info.length)
        raise ConversionError(f"object '{key}' is not in checkpoint '{self.path}'")

    def iter_tensors(self, keys: Optional[Sequence[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, full tensor)`` one at a time (for small checkpoints and tests)."""
        for key in keys if keys is not None else self.model_keys():
            yield key, self.read(key)


def _numel(lengths) -> int:
    n = 1
    for s in lengths:
        n *= s
    return n
