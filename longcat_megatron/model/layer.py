"""The LongCat-Flash shortcut layer (ScMoE), exactly the HF ``LongcatFlashDecoderLayer`` wiring:

    a0 = x  + Attn0(norm_in0(x))
    u0 = norm_post0(a0)
    m  = MoE(u0)                      # shortcut branch, same input as MLP0
    b0 = a0 + MLP0(u0)
    a1 = b0 + Attn1(norm_in1(b0))
    y  = a1 + MLP1(norm_post1(a1)) + m

ScMoE overlap (``model.scmoe_overlap``, alltoall dispatcher, EP > 1): the dispatch all-to-all is
issued right after the router and is in flight during MLP0 + Attn1; then the local experts run and
the combine all-to-all is issued, in flight during MLP1, joined at the end of the layer. Without
overlap the same three parts run synchronously in the same order (identical numbers).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from longcat_megatron.model.attention import LongcatMLA
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.moe import ZeroExpertMoE
from longcat_megatron.model.norm import RMSNorm
from longcat_megatron.model.per_layer_embedding import PerLayerEmbeddingMLP, PerLayerInputs


def dense_mlp(cfg: ModelConfig, tf_config) -> MLP:
    """Tensor-parallel SwiGLU MLP of width ``ffn_hidden_size`` (fc1 = [gate; up])."""
    return MLP(tf_config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                        linear_fc2=RowParallelLinear),
               ffn_hidden_size=cfg.ffn_hidden_size)


def layer_norm(cfg: ModelConfig, tf_config) -> RMSNorm:
    """RMSNorm over hidden states (sequence shards under SP)."""
    return RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype=tf_config.params_dtype,
                   sequence_parallel=bool(tf_config.sequence_parallel))


class ShortcutLayer(MegatronModule):
    """One LongCat decoder layer; ``layer_number`` is its global 0-based index."""

    def __init__(self, cfg: ModelConfig, tf_config, layer_number: int):
        super().__init__(config=tf_config)
        self.layer_number = layer_number
        self.input_layernorm_0 = layer_norm(cfg, tf_config)
        self.self_attention_0 = LongcatMLA(cfg, tf_config)
        self.pre_mlp_layernorm_0 = layer_norm(cfg, tf_config)
        self.mlps_0 = self._dense(cfg, tf_config, 0)
        self.mlp = ZeroExpertMoE(cfg, tf_config, layer_number)
        self.input_layernorm_1 = layer_norm(cfg, tf_config)
        self.self_attention_1 = LongcatMLA(cfg, tf_config)
        self.pre_mlp_layernorm_1 = layer_norm(cfg, tf_config)
        self.mlps_1 = self._dense(cfg, tf_config, 1)
        self.per_layer = cfg.per_layer_embedding != "none"

    def _dense(self, cfg: ModelConfig, tf_config, index: int):
        """Dense MLP ``index`` (0/1): SwiGLU, or with ``model.per_layer_embedding`` the gate times
        this MLP's own embedding of the tokens (init stream 1 + 2 * layer + index)."""
        if cfg.per_layer_embedding == "none":
            return dense_mlp(cfg, tf_config)
        return PerLayerEmbeddingMLP(cfg, tf_config, stream=1 + 2 * self.layer_number + index)

    def _mlp(self, mlp, x, per_layer: Optional[PerLayerInputs]):
        return mlp(x, per_layer)[0] if self.per_layer else mlp(x)[0]

    def forward(self, x: torch.Tensor, rotary, attention_mask: Optional[torch.Tensor] = None,
                per_layer: Optional[PerLayerInputs] = None):
        a0 = x + self.self_attention_0(self.input_layernorm_0(x), rotary, attention_mask)
        u0 = self.pre_mlp_layernorm_0(a0)
        moe = self.mlp.dispatch_tokens(u0)              # dispatch in flight ...
        b0 = a0 + self._mlp(self.mlps_0, u0, per_layer)
        a1 = b0 + self.self_attention_1(self.input_layernorm_1(b0), rotary, attention_mask)
        moe = self.mlp.run_experts(moe)                 # ... joined; experts; combine in flight ...
        y = a1 + self._mlp(self.mlps_1, self.pre_mlp_layernorm_1(a1), per_layer)
        return y + self.mlp.combine_tokens(moe)         # ... joined
