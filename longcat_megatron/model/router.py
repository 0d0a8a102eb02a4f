"""Router over N FFN experts + Z zero-computation experts (HF ``LongcatFlashTopkRouter`` semantics).

fp32 logits and softmax over all N+Z experts; top-k on ``score + expert_bias`` (the bias only
selects); weights = unbiased scores x ``routed_scaling_factor``, no renormalisation. The result is
split: the FFN part (dense probs / routing map over N experts, what megatron's token dispatchers
take) and the per-token sum of the zero-expert weights (applied locally, no communication).

The router also accumulates this step's statistics (picks per expert, tokens, entropy) while
training; the budget controller consumes them in :meth:`end_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import MegatronModule

from longcat_megatron import collectives
from longcat_megatron.model import aux_losses
from longcat_megatron.model.budget_controller import BudgetController
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.full_precision import KeepsFullPrecision
from longcat_megatron.model.parallel_info import sequence_parallel_size


@dataclass
class Routing:
    """One forward's routing decision for ``T`` local tokens."""

    ffn_probs: torch.Tensor     # [T, N] weights of the picked FFN experts (0 elsewhere)
    ffn_map: torch.Tensor       # [T, N] bool
    zero_weight: torch.Tensor   # [T] sum of the picked zero experts' weights
    aux_loss: Optional[torch.Tensor] = None


class ZeroExpertRouter(KeepsFullPrecision, MegatronModule):
    """``router(x [s, b, H]) -> Routing`` (megatron's router slot; the MoE calls it as a module).

    Its weight (fp32 in the released model), expert bias and step statistics keep their dtype under
    bf16 (:mod:`longcat_megatron.model.full_precision`); logits and softmax are computed in fp32."""

    full_precision_names = ("weight", "expert_bias", "step_picks", "step_tokens", "step_entropy")

    def __init__(self, cfg: ModelConfig, tf_config, layer_number: int = 0):
        super().__init__(config=tf_config)
        self.cfg = cfg
        self.num_ffn = cfg.num_experts
        self.num_total = cfg.num_experts + cfg.zero_expert_num
        self.topk = cfg.moe_router_topk
        self.layer_number = layer_number
        weight = torch.empty(self.num_total, cfg.hidden_size, dtype=torch.float32)
        torch.nn.init.normal_(weight, mean=0.0, std=tf_config.init_method_std)  # a hidden matrix
        self.weight = torch.nn.Parameter(weight)
        # Router sees only this rank's sequence shard under SP: all-reduce its grad over TP.
        setattr(self.weight, "sequence_parallel", bool(tf_config.sequence_parallel))
        self.register_buffer("expert_bias", torch.zeros(self.num_total, dtype=torch.float32))
        self.controller = (BudgetController(cfg) if cfg.budget_target_ffn_experts is not None
                           else None)
        # This step's statistics (not checkpointed): picks per expert, tokens, entropy sum.
        self.last_lb_loss: Optional[torch.Tensor] = None
        self.register_buffer("step_picks", torch.zeros(self.num_total, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("step_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("step_entropy", torch.zeros((), dtype=torch.float64), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None) -> Routing:
        """Route ``hidden_states [s, b, H]``. Callers go through ``self.router(x)``, not
        :meth:`route`: the weight is then read inside this module's forward, where megatron's
        overlapped parameter all-gather waits for it (its forward pre-hook)."""
        return self.route(hidden_states)

    def route(self, x: torch.Tensor) -> Routing:
        tokens = x.reshape(-1, x.shape[-1])
        logits = torch.nn.functional.linear(tokens.float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        with torch.no_grad():
            picked = torch.topk(scores + self.expert_bias, self.topk, dim=-1, sorted=False)[1]
        weights = scores.gather(1, picked) * self.cfg.routed_scaling_factor
        dense = torch.zeros_like(scores).scatter(1, picked, weights)
        pick_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, picked, True)
        routing = Routing(
            ffn_probs=dense[:, : self.num_ffn],
            ffn_map=pick_map[:, : self.num_ffn].contiguous(),
            zero_weight=dense[:, self.num_ffn:].sum(-1),
        )
        picks = pick_map.sum(0).double()
        if self.training and not _recomputing():
            with torch.no_grad():
                self.step_picks += picks
                self.step_tokens += tokens.shape[0]
                ent = -(scores * torch.log(scores.clamp_min(1e-30))).sum(-1)
                self.step_entropy += ent.double().sum()
        if self.cfg.device_lb_loss_coeff > 0 and self.training:
            routing.aux_loss = self._device_lb_loss(scores, picks)
        return routing

    def _device_lb_loss(self, scores: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        sp = sequence_parallel_size(self.config)
        global_tokens = float(scores.shape[0] * sp)
        if sp > 1:
            picks = picks.clone()
            collectives.all_reduce(picks, group=ps.get_tensor_model_parallel_group())
        loss = aux_losses.device_load_balance_loss(
            scores, picks, num_ffn=self.num_ffn, groups=self.cfg.device_lb_groups,
            topk=self.topk, target=float(self.cfg.budget_target_ffn_experts),
            global_tokens=global_tokens, coeff=self.cfg.device_lb_loss_coeff)
        self.last_lb_loss = loss.detach()
        return aux_losses.in_loss_units(loss, global_tokens, self.config)

    @torch.no_grad()
    def end_step(self) -> dict:
        """Sum this step's statistics (every micro-batch of the optimizer step, every DP x CP rank,
        and the TP ranks' sequence shards under SP: each token once), update the FFN bias (if the
        controller is on), reset the statistics; returns this layer's metrics."""
        stats = torch.cat([self.step_picks, self.step_tokens[None], self.step_entropy[None]])
        if ps.model_parallel_is_initialized() and torch.distributed.is_initialized():
            # Without SP every TP rank routes the same tokens: count them on one TP rank's group.
            group = (ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
                     if sequence_parallel_size(self.config) > 1
                     else ps.get_data_parallel_group(with_context_parallel=True))
            collectives.all_reduce(stats, group=group)
        picks, tokens, entropy = stats[: self.num_total], float(stats[-2]), float(stats[-1])
        self.step_picks.zero_()
        self.step_tokens.zero_()
        self.step_entropy.zero_()
        if tokens == 0:
            return {}
        ffn = picks[: self.num_ffn]
        if self.controller is not None:
            self.expert_bias[: self.num_ffn] += self.controller.step(ffn, tokens).float()
        mean_load = ffn.mean().clamp_min(1e-12)
        return {
            "ffn_experts_per_token": float(ffn.sum() / tokens),
            "load_min_over_mean": float(ffn.min() / mean_load),
            "load_max_over_mean": float(ffn.max() / mean_load),
            "router_entropy": entropy / tokens,
        }


def _recomputing() -> bool:
    """True inside the backward pass, where activation recomputation re-runs forwards: the step's
    statistics count each routed token once (in the first forward)."""
    return torch._C._current_graph_task_id() != -1
