"""Auxiliary losses that enter the backward pass inside the model.

They are attached to an activation with megatron-core's ``MoEAuxLossAutoScaler`` (identity forward;
backward adds d(loss) scaled by the schedule's main-loss scale, which megatron's pipeline schedules
set from ``num_microbatches`` because the config has MoE experts). Losses computed on a sequence
shard (sequence parallelism) are normalised by the global token count, so that their sum over the
tensor-parallel ranks is the loss of the whole sequence.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def in_loss_units(mean_loss: torch.Tensor, tokens: float, tf_config) -> torch.Tensor:
    """A per-token-mean loss in the main loss's units: with ``calculate_per_token_loss`` the main
    loss is a token *sum* (gradients are divided by the global token count later), so the mean is
    multiplied by the ``tokens`` it averages over."""
    if getattr(tf_config, "calculate_per_token_loss", False):
        return mean_loss * tokens
    return mean_loss


def attach(activation: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``activation`` unchanged, with ``loss`` added to the backward pass."""
    return MoEAuxLossAutoScaler.apply(activation, loss)


def hidden_z_loss(hidden: torch.Tensor, coeff: float,
                  loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coeff * sum_t m_t (logsumexp_i |h_t^i|)^2, sum_t m_t)`` over the tokens of
    ``hidden [s, b, H]`` with ``loss_mask [s, b]`` (padding and prompt tokens of SFT have m_t = 0,
    so they neither add to the loss nor dilute its mean)."""
    lse = torch.logsumexp(hidden.float().abs(), dim=-1)
    mask = loss_mask.to(lse.dtype)
    return coeff * (lse.pow(2) * mask).sum(), mask.sum()


def device_load_balance_loss(scores: torch.Tensor, picks: torch.Tensor, *, num_ffn: int,
                             groups: int, topk: int, target: float, global_tokens: float,
                             coeff: float) -> torch.Tensor:
    """Device-level LB loss with the zero-expert group: ``coeff * sum_j f_j P_j``.

    The N FFN experts form ``groups`` equal groups, all zero experts form one more group.
    ``f_j = groups / (K_e T) * picks_j`` for FFN groups, ``f_zero = picks_zero / ((K - K_e) T)``,
    ``P_j = (1/T) sum_t sum_{i in j} s_t,i``. ``scores [T_local, N+Z]`` are the softmax scores,
    ``picks [N+Z]`` the global pick counts of this step (no gradient), T the global token count.
    """
    tokens_local = scores.shape[0]
    ffn_scores = scores[:, :num_ffn].reshape(tokens_local, groups, num_ffn // groups).sum(-1)
    p_ffn = ffn_scores.sum(0) / global_tokens
    f_ffn = picks[:num_ffn].reshape(groups, -1).sum(-1) * (groups / (target * global_tokens))
    loss = (f_ffn.to(p_ffn.dtype) * p_ffn).sum()
    if scores.shape[1] > num_ffn and topk > target:
        p_zero = scores[:, num_ffn:].sum() / global_tokens
        f_zero = picks[num_ffn:].sum() / ((topk - target) * global_tokens)
        loss = loss + f_zero.to(p_zero.dtype) * p_zero
    return coeff * loss
