"""Collectives for control-plane flags and small statistics that are right under NCCL and gloo.

The rule (docs/architecture.md, "Rules that hold everywhere"): a tensor handed to a
``torch.distributed`` collective lives on the device of the group's backend. NCCL groups (every
megatron group of a GPU run) take only CUDA tensors, so a flag built on the CPU must move to
:func:`longcat_megatron.runtime.device` first; gloo groups take CPU tensors. Project code therefore
sends stop flags, loss sums, routing counts and similar small statistics through :func:`all_reduce`
(or :func:`any_rank`), which places the tensor for the group and hands the
result back where the caller keeps it. Data-plane exchanges on activations (the N-gram lookup,
megatron's own collectives) already hold model tensors, which live on ``runtime.device()``.

Python-object collectives (``all_gather_object`` and friends) are not used by project code, and no
world-wide gloo group exists for them (``runtime.init_distributed`` creates only the default group:
a world group of gloo costs every rank world - 1 TCP connections at start-up). Code that needs one
passes one of megatron's gloo groups explicitly, e.g.
``parallel_state.get_data_parallel_group_gloo()`` (collective over that group's ranks only; it
exists once ``runtime.init_parallel_state`` ran); the audit in tests/test_collectives.py fails an
object collective on any other group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def device_for(group=None) -> torch.device:
    """Where a tensor for a collective over ``group`` must live: CPU for gloo, else the rank's
    accelerator (``runtime.device()``)."""
    from longcat_megatron import runtime

    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return runtime.device()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce ``tensor`` (on any device) over ``group`` in place; returns it. A tensor not on
    the group's device travels there and back (one small copy each way)."""
    if not dist.is_initialized():
        return tensor
    target = device_for(group)
    work = tensor if tensor.device == target else tensor.to(target)
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is true on any rank of ``group``."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce(t, dist.ReduceOp.MAX, group).item())
