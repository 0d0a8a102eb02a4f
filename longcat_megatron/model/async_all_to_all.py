"""An all-to-all that is started in forward and joined later, for the ScMoE overlap.

``start_all_to_all(group, x, output_splits, input_splits)`` issues
``torch.distributed.all_to_all_single(..., async_op=True)`` and returns a :class:`PendingAllToAll`;
``pending.wait()`` joins it and returns the received tensor, connected to autograd. Between the two
the caller computes something else (the dense branch of the shortcut layer): with NCCL the
collective runs on NCCL's own stream while the default stream computes, with gloo it runs on gloo's
worker thread while the main thread computes. The backward all-to-all (the transposed exchange) is
synchronous: in backward the dense branch's gradients are not independent of it in the same way.

Split sizes follow ``megatron.core.tensor_parallel.mappings.all_to_all`` (``output_splits`` = rows
received from each rank, ``input_splits`` = rows sent to each rank; ``None`` = equal split). A group
of size 1 is a no-op, as in megatron.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _splits(s) -> Optional[list]:
    return None if s is None else [int(v) for v in s]


def _empty_output(x: torch.Tensor, output_splits: Optional[list]) -> torch.Tensor:
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    return x.new_empty((rows, *x.shape[1:]))


class _Issue(torch.autograd.Function):
    """Forward: start the exchange into a fresh buffer (filled once the work completes)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits, box):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        x = x.contiguous()
        out = _empty_output(x, output_splits)
        box["work"] = dist.all_to_all_single(out, x, output_split_sizes=output_splits,
                                             input_split_sizes=input_splits, group=group,
                                             async_op=True)
        box["keep"] = x   # the send buffer must live until the work completes
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = _empty_output(grad, ctx.input_splits)
        dist.all_to_all_single(out, grad, output_split_sizes=ctx.input_splits,
                               input_split_sizes=ctx.output_splits, group=ctx.group)
        return out, None, None, None, None


class _Join(torch.autograd.Function):
    """Forward: wait for the work; identity for autograd."""

    @staticmethod
    def forward(ctx, out, box):
        box.pop("work").wait()
        box.pop("keep", None)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PendingAllToAll:
    """An all-to-all in flight; :meth:`wait` returns its output (exactly once)."""

    def __init__(self, out: torch.Tensor, box: Optional[dict]):
        self._out, self._box = out, box

    def wait(self) -> torch.Tensor:
        out, box = self._out, self._box
        self._out = self._box = None
        if out is None:
            raise RuntimeError("PendingAllToAll.wait() called twice")
        return out if box is None else _Join.apply(out, box)


def start_all_to_all(group, x: torch.Tensor, output_splits: Optional[Sequence[int]] = None,
                     input_splits: Optional[Sequence[int]] = None) -> PendingAllToAll:
    """Issue the all-to-all of ``x`` over ``group`` asynchronously (see the module docstring)."""
    if group is None or group.size() == 1:
        return PendingAllToAll(x, None)
    box: dict = {}
    out = _Issue.apply(x, group, _splits(output_splits), _splits(input_splits), box)
    return PendingAllToAll(out, box)
