"""Model hyper-parameters (the ``model:`` section of a run config).

``arch: gpt`` builds megatron-core's GPTModel with the local layer spec (the baseline the training
loop was proven on); ``arch: longcat`` builds the LongCat-Flash model (``longcat_megatron.model``).
Fields that only one architecture reads say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ModelConfigError(ValueError):
    """Invalid model hyper-parameters; the message names the field."""


@dataclass
class ModelConfig:
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # MoE (gpt: megatron-core MoE on every layer; longcat: the FFN experts of the shortcut MoE).
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_token_dispatcher_type: str = "allgather"
    moe_aux_loss_coeff: float = 0.0

    def validate(self) -> None:
        """Shape checks that need no process group."""
        if self.arch not in ("gpt", "longcat"):
            raise ModelConfigError(f"model.arch={self.arch!r}: use 'gpt' or 'longcat'")
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts is not None and self.moe_router_topk > self.num_experts:
            raise ModelConfigError(
                f"model.moe_router_topk={self.moe_router_topk} > model.num_experts={self.num_experts}"
            )
        if self.moe_token_dispatcher_type not in ("allgather", "alltoall"):
            raise ModelConfigError(
                f"model.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}: "
                "use allgather or alltoall"
            )
