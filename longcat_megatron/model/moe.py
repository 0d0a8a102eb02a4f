"""MoE with zero-computation experts on megatron-core's expert parallelism.

Only the FFN picks are dispatched (megatron's allgather/alltoall token dispatcher; the local experts
are ``model.expert_impl``, see :mod:`longcat_megatron.model.experts`, SwiGLU of width
``moe_ffn_hidden_size``); zero experts cost no communication: their contribution
``(sum of zero weights) * x`` is added locally. The forward is split in three parts (dispatch,
experts, combine) so that the shortcut layer can run its dense branch while tokens are in flight
(:mod:`longcat_megatron.model.layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from longcat_megatron.model import aux_losses
from longcat_megatron.model.async_all_to_all import PendingAllToAll, start_all_to_all
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.experts import building_layer, experts_spec
from longcat_megatron.model.router import Routing, ZeroExpertRouter


@dataclass
class InFlight:
    """State of one MoE call between :meth:`ZeroExpertMoE.dispatch_tokens`,
    :meth:`ZeroExpertMoE.run_experts` and :meth:`ZeroExpertMoE.combine_tokens`."""

    x: torch.Tensor
    routing: Routing
    tokens: Optional[PendingAllToAll] = None     # dispatched hidden states (in flight)
    probs: Optional[PendingAllToAll] = None      # their routing weights (in flight)
    expert_args: Optional[tuple] = None          # (tokens, tokens_per_expert, probs) once received
    combined: Optional[PendingAllToAll] = None   # expert outputs on their way back


class ZeroExpertMoE(MoELayer):
    """Megatron ``MoELayer`` whose router knows zero experts; ``forward(x) -> (y, None)``.

    The forward is split in three so that a shortcut layer can compute between the parts:
    :meth:`dispatch_tokens` (route, start the dispatch all-to-all), :meth:`run_experts` (join it, run
    the local experts, start the combine all-to-all) and :meth:`combine_tokens` (join it, unpermute,
    add the zero experts). With ``model.scmoe_overlap`` and the alltoall dispatcher at EP > 1 the
    all-to-alls are asynchronous; otherwise each part runs synchronously (same numbers).
    """

    def __init__(self, cfg: ModelConfig, tf_config, layer_number: int = 0):
        experts = experts_spec(cfg.expert_impl, cfg.num_experts)
        submodules = MoESubmodules(
            experts=experts,
            router=lambda config, pg_collection: ZeroExpertRouter(cfg, config, layer_number),
        )
        with building_layer(layer_number):  # experts: one random stream per global expert
            super().__init__(config=tf_config, submodules=submodules, layer_number=layer_number)
        self.cfg = cfg
        self.overlap = bool(cfg.scmoe_overlap) and isinstance(self.token_dispatcher,
                                                                MoEAlltoAllTokenDispatcher)

    def dispatch_tokens(self, x: torch.Tensor) -> InFlight:
        """Route ``x [s, b, H]`` and send the FFN picks to their expert-parallel ranks."""
        routing = self.router(x)   # through forward: megatron's param-gather pre-hook runs
        d = self.token_dispatcher
        hidden, probs = d.dispatch_preprocess(x, routing.ffn_map, routing.ffn_probs)
        if not self.overlap:
            # dispatch_postprocess right away: the allgather dispatcher's gathered tokens may live
            # in a buffer that the dense branch reuses
            hidden, probs = d.token_dispatch(hidden, probs)
            return InFlight(x, routing, expert_args=d.dispatch_postprocess(hidden, probs))
        # megatron's MoEAlltoAllTokenDispatcher.token_dispatch, with the exchange left in flight
        d.tokens_per_expert = d._maybe_dtoh_and_synchronize("before_ep_alltoall",
                                                            d.tokens_per_expert)
        return InFlight(x, routing,
                        start_all_to_all(d.ep_group, hidden, d.output_splits, d.input_splits),
                        start_all_to_all(d.ep_group, probs, d.output_splits, d.input_splits))

    def run_experts(self, flight: InFlight) -> InFlight:
        """Receive the dispatched tokens, run the local experts, start sending the outputs back."""
        d = self.token_dispatcher
        if flight.expert_args is None:
            flight.expert_args = d.dispatch_postprocess(flight.tokens.wait(), flight.probs.wait())
        out, _ = self.experts(*flight.expert_args)
        flight.expert_args = None
        out = d.combine_preprocess(out)
        if self.overlap:
            flight.combined = start_all_to_all(d.ep_group, out, d.input_splits, d.output_splits)
        else:
            flight.combined = PendingAllToAll(d.token_combine(out), None)
        return flight

    def combine_tokens(self, flight: InFlight) -> torch.Tensor:
        """Join the returning expert outputs, unpermute them and add the zero experts."""
        if flight.combined is None:
            flight = self.run_experts(flight)
        out = self.token_dispatcher.combine_postprocess(flight.combined.wait())
        zero = flight.routing.zero_weight.view(*flight.x.shape[:-1], 1).to(flight.x.dtype)
        y = out + zero * flight.x
        if flight.routing.aux_loss is not None:
            y = aux_losses.attach(y, flight.routing.aux_loss)
        return y

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        return self.combine_tokens(self.dispatch_tokens(hidden_states)), None
