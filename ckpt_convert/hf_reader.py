"""Streaming reader of a Hugging Face safetensors model directory (one tensor at a time, via mmap).

Handles both on-disk layouts of LongCat-Flash MoE experts:

* Meituan's released layout (and what transformers 5.x ``save_pretrained`` writes): per-expert keys
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers 5.x also writes ``gate/up`` for the
  zero (identity) experts ``e >= n_routed_experts``, which are never used and are skipped here;
* transformers' fused in-memory layout, if someone saved it raw: ``mlp.experts.gate_up_proj``
  ``[N(+Z), 2*I, H]`` (gate rows first) and ``mlp.experts.down_proj`` ``[N, H, I]``.

:meth:`HFCheckpointReader.expert` returns one expert's ``(gate, up, down)`` whichever layout is present.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Optional

import torch

from ckpt_convert import ConversionError
from ckpt_convert.dcp_reader import TensorInfo
from ckpt_convert.file_io import pread_fully, tensor_bytes

INDEX_NAME = "model.safetensors.index.json"
# LongCat-Flash-Lite ships its MTP tensors in this file, outside the index.
AUXILIARY_NAME = "model-auxiliary.safetensors"
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class HFCheckpointReader:
    """Keys, shapes and tensors of an HF model directory (``*.safetensors`` [+ index])."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise ConversionError(f"Hugging Face directory '{path}' does not exist")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"'{path}' has no config.json")
        try:
            self.config: dict = json.load(open(cfg_path))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path} is not valid JSON: {e}") from None
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            weight_map: dict = json.load(open(index)).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            if AUXILIARY_NAME not in files and os.path.isfile(os.path.join(path, AUXILIARY_NAME)):
                files.append(AUXILIARY_NAME)
        else:
            weight_map = {}
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ConversionError(f"'{path}' has no *.safetensors files")
        self.file_of: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[int, int]] = {}  # key -> (absolute byte offset, length)
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                some = next(k for k, v in weight_map.items() if v == name)
                raise ConversionError(f"shard '{full}' listed in {INDEX_NAME} is missing (holds e.g. '{some}')")
            self._index_file(name, full)
        for key, name in weight_map.items():
            if self.file_of.get(key) != name:
                raise ConversionError(f"{INDEX_NAME} says '{key}' is in '{name}' but that file lacks it")

    def _index_file(self, name: str, full: str) -> None:
        """Parse one safetensors header (8-byte length + JSON) and check the file is long enough."""
        size = os.path.getsize(full)
        try:
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (ValueError, struct.error) as e:
            raise ConversionError(f"'{full}' is not a valid safetensors file ({e})") from None
        base = 8 + n
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if base + end > size:
                raise ConversionError(f"'{full}' is truncated: tensor '{key}' ends at byte {base + end}, "
                                      f"the file has {size}")
            if meta["dtype"] not in _ST_DTYPES:
                raise ConversionError(f"'{full}': tensor '{key}' has unsupported dtype {meta['dtype']}")
            self.file_of[key] = name
            self.tensors[key] = TensorInfo(key, tuple(meta["shape"]), _ST_DTYPES[meta["dtype"]])
            self._where[key] = (base + begin, end - begin)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise ConversionError(f"key '{key}' is not in the Hugging Face checkpoint '{self.path}'")
        return self.tensors[key]

    def read_rows(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t[start:stop]`` of tensor ``key``, read with ``os.preadv`` straight into a fresh tensor
        (or into ``out``, a contiguous CPU tensor of that shape and dtype): no mmap, only these bytes
        enter memory, one copy, the GIL released."""
        info = self.info(key)
        offset, length = self._where[key]
        rows = info.shape[0] if info.shape else 1
        row_bytes = length // max(rows, 1)
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{key}: rows {start}:{stop} outside {rows}")
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=info.dtype)
        elif tuple(out.shape) != tuple(shape) or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"{key}: rows {start}:{stop} are {shape} {info.dtype}, not {tuple(out.shape)} "
                             f"{out.dtype}")
        full = os.path.join(self.path, self.file_of[key])
        view = tensor_bytes(out) if out.numel() else memoryview(b"")
        try:
            fd = os.open(full, os.O_RDONLY)
            try:
                if not pread_fully(fd, view, offset + start * row_bytes):
                    raise ConversionError(f"'{full}' is truncated inside tensor '{key}'")
            finally:
                os.close(fd)
        except OSError as e:
            raise ConversionError(f"cannot read '{key}' from {full}: {e}") from None
        return out

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a fresh CPU tensor; only its bytes are read)."""
        info = self.info(key)
        return self.read_rows(key, 0, info.shape[0] if info.shape else 1).reshape(info.shape)

    def read_row(self, key: str, i: int) -> torch.Tensor:
        """``t[i]`` of tensor ``key`` without reading the rest of it."""
        return self.read_rows(key, i, i + 1)[0]

    # --------------------------------------------------------------------------- MoE experts
    def expert(self, prefix: str, e: int, ffn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [I,H], up [I,H], down [H,I])`` of FFN expert ``e`` under ``prefix``
        (``model.layers.L.mlp.experts``), from per-expert keys or the fused layout."""
        per = [f"{prefix}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
        if all(self.has(k) for k in per):
            return tuple(self.read(k) for k in per)  # type: ignore[return-value]
        fused_gu, fused_d = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
        if self.has(fused_gu) and self.has(fused_d):
            gu = self.read_row(fused_gu, e)
            if gu.shape[0] != 2 * ffn:
                raise ConversionError(
                    f"'{fused_gu}' rows {gu.shape[0]} != 2 * expert_ffn_hidden_size ({2 * ffn})"
                )
            return gu[:ffn].clone(), gu[ffn:].clone(), self.read_row(fused_d, e)
        missing = next(k for k in per if not self.has(k))
        raise ConversionError(
            f"expert {e}: neither '{missing}' nor fused '{fused_gu}'/'{fused_d}' is in '{self.path}'"
        )

    def expert_keys(self, prefix: str) -> set[str]:
        """Every stored key under ``prefix.`` (to detect unknown or surplus expert tensors)."""
        return {k for k in self.tensors if k.startswith(prefix + ".")}

    def close(self) -> None:
        """Nothing stays open between reads (kept for symmetry with the writers)."""


def routed_expert_count(reader: HFCheckpointReader, layer_prefix: str) -> Optional[int]:
    """Number of FFN experts that actually have a ``down_proj`` under ``layer_prefix.mlp.experts``."""
    fused = f"{layer_prefix}.mlp.experts.down_proj"
    if reader.has(fused):
        return reader.tensors[fused].shape[0]
    n = 0
    while reader.has(f"{layer_prefix}.mlp.experts.{n}.down_proj.weight"):
        n += 1
    return n
