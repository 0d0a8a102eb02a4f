"""This rank's view of a full (unsharded, TP=PP=EP=1) LongCat state dict, and back.

Layers are keyed by their global index in every layout, so only tensor and expert parallelism
change names or shapes:

* expert parallelism: local expert ``i`` of EP rank ``r`` is global expert ``r * n_local + i``;
* N-gram tables (``row_shard``: this rank's row range over their shard group) are sliced by rows;
* tensor parallelism: a parameter tagged ``tensor_model_parallel`` is split along its
  ``partition_dim`` (expert parameters over the expert-tensor-parallel group); SwiGLU ``linear_fc1``
  holds ``[gate shard; up shard]`` on every rank.

Used to load reference weights into a parallel model and to compare gradients in the tests, and by
checkpoint conversion.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state as ps

_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")


def _is_expert(name: str) -> bool:
    return ".experts.local_experts." in name


def full_key(model: torch.nn.Module, local_key: str) -> str:
    """The full-model key of this rank's ``local_key``."""
    if not _is_expert(local_key):
        return local_key
    n_local = _num_local_experts(model, local_key)
    offset = ps.get_expert_model_parallel_rank() * n_local
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}",
                             local_key, count=1)


def _num_local_experts(model: torch.nn.Module, local_key: str) -> int:
    prefix = local_key.split(".local_experts.")[0] + ".local_experts"
    return len(model.get_submodule(prefix))


def _tp_rank_size(name: str) -> tuple[int, int]:
    if _is_expert(name):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def shard(model: torch.nn.Module, local_key: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor ``full`` for parameter/buffer ``local_key``."""
    p, dim = _param_and_partition_dim(model, local_key)
    row_shard = getattr(p, "row_shard", None)     # NgramEmbedding's tables: their own row range
    if row_shard is not None:
        return full[row_shard[0]:row_shard[1]]
    if p is None or not getattr(p, "tensor_model_parallel", False):
        return full
    rank, size = _tp_rank_size(local_key)
    if size == 1:
        return full
    if local_key.endswith("linear_fc1.weight") and _is_glu(model, local_key):
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=dim)
    return full.chunk(size, dim)[rank]


def _param_and_partition_dim(model: torch.nn.Module, local_key: str):
    """(parameter, partition dim of the tensor named ``local_key``); the grouped experts' per-expert
    keys are slices of their stacked ``weight1``/``weight2`` (expert axis first)."""
    params = dict(model.named_parameters())
    p = params.get(local_key)
    if p is not None:
        return p, getattr(p, "partition_dim", None)
    if _is_expert(local_key):
        prefix, rest = local_key.split(".local_experts.", 1)
        linear = rest.split(".")[1]                                  # "{i}.linear_fc1.weight"
        stacked = params.get(f"{prefix}.weight{linear[-1]}")
        if stacked is not None:
            return stacked, getattr(stacked, "partition_dim", 1) - 1
    return None, None


def _is_glu(model: torch.nn.Module, local_key: str) -> bool:
    """Whether the MLP owning this ``linear_fc1.weight`` is gated (SwiGLU)."""
    module = model.get_submodule(local_key.rsplit(".", 2)[0])
    if hasattr(module, "gated_fc1"):     # per-layer embedding MLPs: fc1 is the gate only
        return module.gated_fc1
    return bool(getattr(getattr(module, "config", None), "gated_linear_unit", False))


def split_stacked_experts(items):
    """``(name, tensor)`` pairs with the grouped experts' stacked ``...experts.weight1/weight2``
    ``[E, ...]`` (their gradients, say) split into SequentialMLP's per-expert names
    ``...experts.local_experts.{i}.linear_fc{1,2}.weight``: the names :func:`full_key` and
    :func:`shard` take."""
    for name, tensor in items:
        stem, _, leaf = name.rpartition(".")
        if leaf in ("weight1", "weight2") and stem.endswith("experts") or name in ("weight1", "weight2"):
            base = f"{stem}." if stem else ""           # the experts module itself: no prefix
            for i, piece in enumerate(tensor.unbind(0) if tensor is not None else ()):
                yield f"{base}local_experts.{i}.linear_fc{leaf[-1]}.weight", piece
        else:
            yield name, tensor


def load_full_state_dict(model: torch.nn.Module, full: dict) -> None:
    """Load this rank's part of the full state dict ``full`` (strict on tensors)."""
    local = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        fk = full_key(model, key)
        if fk not in full:
            raise KeyError(f"full state dict has no {fk!r} (for local {key!r})")
        local[key] = shard(model, key, full[fk])
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing {missing}, unexpected {unexpected}")
