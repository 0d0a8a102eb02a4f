"""MoE with zero-computation experts on megatron-core's expert parallelism.

Only the FFN picks are dispatched (megatron's allgather/alltoall token dispatcher and SequentialMLP
experts, SwiGLU of width ``moe_ffn_hidden_size``); zero experts cost no communication: their
contribution ``(sum of zero weights) * x`` is added locally. The forward is split in two halves,
:meth:`dispatch_tokens` (route + send tokens to their experts) and :meth:`combine_tokens` (expert compute +
return tokens), so that a shortcut layer can run its dense branch between them; on GPU the
communication of both halves can then overlap with MLP0 + Attn1 + MLP1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

from longcat_megatron.model import aux_losses
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.router import Routing, ZeroExpertRouter


@dataclass
class InFlight:
    """State between :meth:`ZeroExpertMoE.dispatch_tokens` and :meth:`ZeroExpertMoE.combine_tokens`."""

    x: torch.Tensor
    routing: Routing
    expert_input: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_probs: torch.Tensor


class ZeroExpertMoE(MoELayer):
    """Megatron ``MoELayer`` whose router knows zero experts; ``forward(x) -> (y, None)``."""

    def __init__(self, cfg: ModelConfig, tf_config, layer_number: int = 0):
        experts = get_moe_module_spec_for_backend(
            LocalSpecProvider(), num_experts=cfg.num_experts).submodules.experts
        submodules = MoESubmodules(
            experts=experts,
            router=lambda config, pg_collection: ZeroExpertRouter(cfg, config, layer_number),
        )
        super().__init__(config=tf_config, submodules=submodules, layer_number=layer_number)
        self.cfg = cfg

    def dispatch_tokens(self, x: torch.Tensor) -> InFlight:
        """Route ``x [s, b, H]`` and send the FFN picks to their expert-parallel ranks."""
        routing = self.router.route(x)
        hidden, probs = self.token_dispatcher.dispatch_preprocess(
            x, routing.ffn_map, routing.ffn_probs)
        hidden, probs = self.token_dispatcher.token_dispatch(hidden, probs)
        expert_input, tokens_per_expert, expert_probs = self.token_dispatcher.dispatch_postprocess(
            hidden, probs)
        return InFlight(x, routing, expert_input, tokens_per_expert, expert_probs)

    def combine_tokens(self, flight: InFlight) -> torch.Tensor:
        """Run the local experts, return tokens to their ranks, add the zero experts."""
        out, _ = self.experts(flight.expert_input, flight.tokens_per_expert, flight.expert_probs)
        out = self.token_dispatcher.combine_preprocess(out)
        out = self.token_dispatcher.token_combine(out)
        out = self.token_dispatcher.combine_postprocess(out)
        zero = flight.routing.zero_weight.view(*flight.x.shape[:-1], 1).to(flight.x.dtype)
        y = out + zero * flight.x
        if flight.routing.aux_loss is not None:
            y = aux_losses.attach(y, flight.routing.aux_loss)
        return y

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        return self.combine_tokens(self.dispatch_tokens(hidden_states)), None
