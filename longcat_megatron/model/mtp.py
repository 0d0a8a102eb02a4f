"""Multi-token-prediction head: one dense layer predicting token t+2 from position t.

    e = Embed_mtp(t+1);  h = final-normed main hidden at t
    z = eh_proj(cat[enorm(e), hnorm(h)])                    (2H -> H, embedding first)
    z = z + MLA(norm_in(z));  z = z + DenseSwiGLU(norm_post(z))
    logits = shared LM head(final_norm(z))

The MTP has its own embedding table (HF ``model.mtp.embed_tokens``), so it lives entirely on the
last pipeline stage. Its loss (mean over the shifted loss mask, x ``mtp_loss_scaling_factor``)
enters the backward through the main hidden state.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule

from longcat_megatron.model.attention import (
    LongcatMLA,
    context_parallel_size,
    cp_global_positions,
    gather_sequence_over_cp,
)
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.layer import dense_mlp, layer_norm
from longcat_megatron.model.parallel_info import sequence_parallel_size


def shift_left(t: torch.Tensor, fill=0) -> torch.Tensor:
    """``[b, s]`` -> the same shifted one position left in the global sequence, last column of the
    sequence = ``fill``. Under context parallelism ``t`` is this rank's share (megatron's
    load-balanced chunks): the whole sequence is gathered over CP (no gradient; ids, labels, masks)
    so that each chunk's last position gets the first token of the next chunk."""
    if context_parallel_size() > 1:
        with torch.no_grad():
            full = gather_sequence_over_cp(t.transpose(0, 1)).transpose(0, 1)
            local = cp_global_positions(t.shape[1], device=t.device)
            return shift_left_whole(full, fill).index_select(1, local)
    return shift_left_whole(t, fill)


def shift_left_whole(t: torch.Tensor, fill=0) -> torch.Tensor:
    """``[b, s]`` of a whole sequence shifted one position left, last column = ``fill``."""
    out = torch.roll(t, shifts=-1, dims=1)
    out[:, -1] = fill
    return out


class MTPHead(MegatronModule):
    """``forward(input_ids [b, s], hidden [s(/tp), b, H], rotary, mask) -> [s(/tp), b, H]``."""

    def __init__(self, cfg: ModelConfig, tf_config):
        super().__init__(config=tf_config)
        self.sequence_parallel = sequence_parallel_size(tf_config) > 1
        self.embedding = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=tf_config.embedding_init_method,
            reduce_scatter_embeddings=self.sequence_parallel, config=tf_config)
        self.enorm = layer_norm(cfg, tf_config)
        self.hnorm = layer_norm(cfg, tf_config)
        self.eh_proj = ColumnParallelLinear(
            2 * cfg.hidden_size, cfg.hidden_size, config=tf_config,
            init_method=tf_config.init_method, bias=False, gather_output=True)
        self.input_layernorm = layer_norm(cfg, tf_config)
        self.self_attention = LongcatMLA(cfg, tf_config)
        self.pre_mlp_layernorm = layer_norm(cfg, tf_config)
        self.mlp = dense_mlp(cfg, tf_config)
        self.final_layernorm = layer_norm(cfg, tf_config)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, rotary,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.embedding(shift_left(input_ids))
        if not self.sequence_parallel:
            emb = emb.transpose(0, 1).contiguous()                     # [s, b, H]
        z, _ = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        if self.sequence_parallel:
            z = tensor_parallel.scatter_to_sequence_parallel_region(z)
        z = z + self.self_attention(self.input_layernorm(z), rotary, attention_mask)
        z = z + self.mlp(self.pre_mlp_layernorm(z))[0]
        return self.final_layernorm(z)
