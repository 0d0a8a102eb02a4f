"""Are the data-parallel replicas of every parameter still bitwise the same?

Each parameter has replicas that must hold the same bits at every step: a dense parameter on the
data-parallel x context-parallel ranks of its (tensor, pipeline) position, an expert parameter
(``allreduce = False``: FFN experts, the N-gram tables under ``partition: tensor_data``) on its
expert-data-parallel ranks. A replica that drifts means the step computed something different on
one rank: a parameter read before its overlapped all-gather finished, a non-deterministic update,
a faulty device. Megatron-LM checks the same with ``--check-weight-hash-across-dp-replicas-interval``
(``megatron.core.utils.check_param_hashes_across_dp_replicas``); that helper hashes on the host
after moving every tensor to CPU, compares dense parameters over DP only (not DP x CP) and calls
``.cuda()``, so this module does the same comparison on the tensors' own device and groups.

:func:`mismatched_parameters` fingerprints each parameter and persistent buffer (two int64 sums of
its raw bits, one position-weighted: any single changed element changes them), reduces the
fingerprints with MIN and MAX over the replica group and reports the names whose MIN and MAX
differ. The training loop calls :func:`check` every ``train.check_replicas_interval`` iterations,
between the forward/backward (which has just read every parameter) and the optimizer step.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from longcat_megatron import collectives

_CHUNK = 1 << 22          # elements fingerprinted at a time (bounds the int64 transient)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas of some parameters differ; the message names them."""


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 on the tensor's device: the sum of its elements' raw bits and the same sum
    weighted by position (mod 65521); equal tensors give equal fingerprints on any device."""
    flat = tensor.detach().reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()])
    out = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start: start + _CHUNK].to(torch.int64)
        weight = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
        out[0] += part.sum()
        out[1] += (part * weight).sum()
    return out


def _replicated_tensors(model_chunks: list) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_expert) of every parameter and persistent buffer of the unwrapped chunks."""
    from longcat_megatron.training.setup import unwrap

    for i, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        prefix = f"{i}." if len(model_chunks) > 1 else ""
        for name, param in model.named_parameters():
            yield prefix + name, param, not getattr(param, "allreduce", True)
        for module_name, module in model.named_modules():
            for name, buf in module._buffers.items():
                if buf is not None and name not in module._non_persistent_buffers_set:
                    yield f"{prefix}{module_name}.{name}".lstrip("."), buf, False


def mismatched_parameters(model_chunks: list) -> list[str]:
    """Names of the parameters/buffers whose replicas differ on this rank's replica groups
    (collective over all ranks of the job)."""
    from megatron.core import parallel_state as ps

    kinds = {
        False: ps.get_data_parallel_group(with_context_parallel=True),
        True: ps.get_expert_data_parallel_group(),
    }
    names: dict[bool, list[str]] = {False: [], True: []}
    prints: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for name, tensor, expert in _replicated_tensors(model_chunks):
        names[expert].append(name)
        prints[expert].append(fingerprint(tensor).cpu())
    bad = []
    for expert, group in kinds.items():
        if not prints[expert] or group.size() == 1:
            continue
        low = torch.stack(prints[expert])
        high = low.clone()
        collectives.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        collectives.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        differ = (low != high).any(dim=1).tolist()
        bad += [n for n, d in zip(names[expert], differ) if d]
    return bad


def check(model_chunks: list, iteration: int) -> None:
    """Raise :class:`ReplicaMismatchError` on every rank when any rank's replicas differ."""
    bad = mismatched_parameters(model_chunks)
    if collectives.any_rank(bool(bad)):
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        where = (f"on this rank ({dist.get_rank()}): {shown}" if bad else
                 "on other ranks (see their logs)")
        raise ReplicaMismatchError(
            f"iteration {iteration}: data-parallel replicas hold different values {where}. The "
            "forward read parameters that differ between replicas (a parameter used before its "
            "all-gather finished, a non-deterministic update, or a faulty device); the checkpoint "
            "before this iteration is the last one known to be consistent")
