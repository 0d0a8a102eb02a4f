"""RMSNorm with the reference's numerics and sequence-parallel tagging.

Computed in fp32 and cast back before the weight multiply, like HF ``LongcatFlashRMSNorm``. When the
norm sees only this rank's sequence shard (sequence parallelism), its weight is tagged
``sequence_parallel`` so that megatron-core's ``finalize_model_grads`` all-reduces its gradient over
the tensor-parallel group; norms applied to full-sequence tensors replicated on every TP rank (the
MLA latents) must not be tagged.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, hidden_size: int, eps: float, *, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
