"""Per-layer embeddings (``model.per_layer_embedding``: ple | plne) in LongCat's dense MLPs.

The SwiGLU up projection of each dense MLP is replaced by an embedding of the tokens that belongs
to that MLP (LongCat-Flash-Lite paper §5):

    FFN(x) = W_d( SiLU(W_g x) ⊙ e(t) )

* ``ple``: ``e(t)`` = a token table ``[V, F]`` (F = ``ffn_hidden_size``);
* ``plne``: ``e(t)`` = an N-gram Embedding of width F (``ngram_embedding.NgramEmbedding`` with
  ``output_width=F``: base table [V, F] + K(N-1) hashed sub-tables of width F/(K(N-1)) with their
  projections, the mean; hash and EOS reset as the input N-gram Embedding), shaped by
  ``ModelConfig.layer_ngram()``.

Parameters (in each ``mlps_0`` / ``mlps_1``): ``linear_fc1`` (ColumnParallel, gate only: [F, H]),
``linear_fc2`` (RowParallel [H, F], as before) and ``per_layer_embedding`` (its ``word_embeddings``
rows over TP like the input embedding's; with plne ``ngram_tables`` rows over
``per_layer_ngram.partition``'s group, ``post_projs`` replicated). The embedding yields
``[s, b, F/TP]``: the whole sequence and this TP rank's columns, the layout of the gate (under SP
fc1 gathers the sequence). The hash rows are computed once per forward for all layers
(:func:`per_layer_inputs`); every module still reads only its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.ngram_embedding import NgramEmbedding, to_tp_columns


@dataclass
class PerLayerInputs:
    """What every per-layer embedding of one forward reads: this rank's token ids ``[b, s]`` and,
    with plne, their table rows ``[s, b, K(N-1)]`` (hashed once)."""

    input_ids: Tensor
    rows: Optional[Tensor] = None


class TokenColumnsEmbedding(MegatronModule):
    """PLE's table: ``input_ids [b, s]`` -> ``[s, b, width/TP]`` (rows over TP, megatron's
    VocabParallelEmbedding; its looked-up rows are summed over TP, then split into columns)."""

    def __init__(self, config, vocab_size: int, width: int):
        super().__init__(config=config)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size, embedding_dim=width, init_method=config.embedding_init_method,
            reduce_scatter_embeddings=False, config=config)

    def forward(self, input_ids: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        out = self.word_embeddings(input_ids).transpose(0, 1).contiguous()
        return to_tp_columns(out, ps.get_tensor_model_parallel_group())


def build_layer_embedding(cfg: ModelConfig, tf_config, stream: int):
    """The per-layer embedding of one dense MLP; ``stream`` seeds its hashed tables' init."""
    if cfg.per_layer_embedding == "ple":
        return TokenColumnsEmbedding(tf_config, cfg.vocab_size, cfg.ffn_hidden_size)
    return NgramEmbedding(tf_config, cfg.vocab_size, cfg.layer_ngram(),
                          max_sequence_length=cfg.max_position_embeddings,
                          output_width=cfg.ffn_hidden_size, column_output=True, init_stream=stream)


class PerLayerEmbeddingMLP(MegatronModule):
    """``W_d(SiLU(W_g x) ⊙ e(t))``; ``forward(x, inputs)`` returns ``(out, None)`` like megatron's
    MLP. ``stream`` (>= 1) is this MLP's init stream (2 per shortcut layer)."""

    gated_fc1 = False   # linear_fc1 holds the gate only (no [gate; up] halves to reshard)

    def __init__(self, cfg: ModelConfig, tf_config, stream: int):
        super().__init__(config=tf_config)
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_hidden_size, config=tf_config,
            init_method=tf_config.init_method, gather_output=False, bias=False, skip_bias_add=True,
            tp_comm_buffer_name="fc1")
        self.per_layer_embedding = build_layer_embedding(cfg, tf_config, stream)
        self.linear_fc2 = RowParallelLinear(
            cfg.ffn_hidden_size, cfg.hidden_size, config=tf_config,
            init_method=tf_config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, tp_comm_buffer_name="fc2")

    def forward(self, hidden_states: Tensor, inputs: PerLayerInputs):
        if inputs is None:
            raise ValueError("model.per_layer_embedding: the dense MLP needs the token ids "
                             "(LongcatModel.forward passes them)")
        gate, _ = self.linear_fc1(hidden_states)                            # [s, b, F/TP]
        e = self.per_layer_embedding(inputs.input_ids, rows=inputs.rows)    # [s, b, F/TP]
        out, _ = self.linear_fc2(F.silu(gate) * e.to(gate.dtype))
        return out, None


def per_layer_inputs(layers, input_ids: Optional[Tensor]) -> Optional[PerLayerInputs]:
    """The per-layer inputs of one forward (None without per-layer embeddings): the hash rows
    are computed here once, by the first layer's embedding (all share one n-gram shape)."""
    embeddings = [m for m in layers.modules() if isinstance(m, PerLayerEmbeddingMLP)]
    if not embeddings:
        return None
    if input_ids is None:
        raise ValueError("model.per_layer_embedding needs input_ids on every pipeline stage")
    first = embeddings[0].per_layer_embedding
    rows = first.table_rows(input_ids) if isinstance(first, NgramEmbedding) else None
    return PerLayerInputs(input_ids=input_ids, rows=rows)
