"""LongCat-Flash with N-gram Embedding (LongCat-Flash-Lite architecture) for ``transformers``.

Shipped next to exported weights so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads and generates offline.
Written for the longcat-megatron project from the released semantics; the backbone (MLA, dense MLPs,
router, RMSNorm, RoPE) is transformers' own ``LongcatFlash`` code.

N-gram Embedding (for each position ``p`` of the current EOS-delimited segment)::

    id_{n,k}(p) = ( t_p + sum_{s=1}^{n-1} t'_{p-s} * (V^s mod M_{n,k}) ) mod M_{n,k}
    M_{n,k}     = ngram_vocab_size_ratio * V + 2*idx + 1,   idx = (n-2)*K + k
    e_p         = ( E_0(t_p) + sum_idx post_projs[idx](embedders[idx](id_idx(p))) ) / (1 + K*(N-1))

where ``t'_{q}`` is the token at ``q``, or 0 when ``q`` is before the sequence start or before the
start of ``p``'s segment (segments end at and include each ``eos_token_id``).

MoE experts are stored per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``, FFN experts only,
Meituan's layout); zero experts are the identity and have no weights.

Generation keeps the last ``N-1`` raw tokens in the KV cache object (``ngram_context``), so cached
decoding gives the same ids as recomputing the full sequence.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.longcat_flash.modeling_longcat_flash import (
    LongcatFlashDecoderLayer,
    LongcatFlashForCausalLM,
    LongcatFlashMLA,
    LongcatFlashMLP,
    LongcatFlashModel,
    LongcatFlashPreTrainedModel,
    LongcatFlashRMSNorm,
    LongcatFlashRotaryEmbedding,
    LongcatFlashTopkRouter,
)

from .configuration_longcat_ngram import LongcatFlashNgramConfig


# ------------------------------------------------------------------------------------ n-gram ids
def ngram_moduli(config) -> list[int]:
    """Hash modulus (= rows) of each sub-table, in table order idx = (n-2)*K + k."""
    m = config.ngram_vocab_size_ratio * config.vocab_size
    count = config.emb_split_num * (config.emb_neighbor_num - 1)
    return [int(m + 2 * idx + 1) for idx in range(count)]


def shift_right_within_segments(tokens: torch.Tensor, shift: int, eos_token_id) -> torch.Tensor:
    """``out[..., p] = tokens[..., p-shift]`` when ``p-shift`` is in ``p``'s segment, else 0.

    Segments end at and include each EOS, so an EOS sees its own look-back and the token after it
    sees none.
    """
    out = torch.zeros_like(tokens)
    if shift >= tokens.shape[-1]:
        return out
    if eos_token_id is None:
        segment = torch.zeros_like(tokens)
    else:
        eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        is_eos = torch.zeros_like(tokens, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= tokens == e
        is_eos = is_eos.long()
        segment = torch.cumsum(is_eos, dim=-1) - is_eos  # EOS strictly before p
    same = segment[..., shift:] == segment[..., :-shift]
    out[..., shift:] = torch.where(same, tokens[..., :-shift], torch.zeros_like(tokens[..., :-shift]))
    return out


def ngram_ids(context: torch.Tensor, config, num_new: int) -> list[torch.Tensor]:
    """Sub-table ids (int64) of the last ``num_new`` positions of ``context``, one tensor per table."""
    n_max, k_split, vocab = config.emb_neighbor_num, config.emb_split_num, config.vocab_size
    context = context.long()
    shifted = {s: shift_right_within_segments(context, s, config.eos_token_id) for s in range(1, n_max)}
    moduli = ngram_moduli(config)
    ids = []
    for n in range(2, n_max + 1):
        for k in range(k_split):
            mod = moduli[(n - 2) * k_split + k]
            acc = context % mod
            power = 1
            for s in range(1, n):
                power = (power * vocab) % mod
                acc = (acc + (shifted[s] % mod) * power) % mod
            ids.append(acc[..., -num_new:])
    return ids


class NgramEmbedding(nn.Module):
    """The N-gram sub-tables and their projections (the base table is ``model.embed_tokens``)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        count = config.emb_split_num * (config.emb_neighbor_num - 1)
        if count < 1:
            raise ValueError("emb_neighbor_num must be >= 2 and emb_split_num >= 1")
        if config.hidden_size % count:
            raise ValueError(
                f"hidden_size={config.hidden_size} must be divisible by emb_split_num*(emb_neighbor_num-1)={count}"
            )
        dim = config.hidden_size // count
        pad = config.pad_token_id
        self.embedders = nn.ModuleList(
            [nn.Embedding(rows, dim, padding_idx=pad if pad is not None and pad < rows else None)
             for rows in ngram_moduli(config)]
        )
        self.post_projs = nn.ModuleList([nn.Linear(dim, config.hidden_size, bias=False) for _ in range(count)])

    def forward(self, input_ids: torch.Tensor, word_embeddings: nn.Embedding,
                ngram_context: torch.Tensor | None = None) -> torch.Tensor:
        context = input_ids if ngram_context is None else torch.cat([ngram_context, input_ids], dim=-1)
        x = word_embeddings(input_ids)
        for ids, table, proj in zip(ngram_ids(context, self.config, input_ids.shape[-1]),
                                    self.embedders, self.post_projs):
            x = x + proj(table(ids))
        return x / (1 + len(self.embedders))


# --------------------------------------------------------------------------------- per-expert MoE
class LongcatFlashNgramMoE(nn.Module):
    """Router + per-expert SwiGLU experts; experts ``>= n_routed_experts`` are the identity."""

    def __init__(self, config):
        super().__init__()
        self.num_routed = config.n_routed_experts
        self.router = LongcatFlashTopkRouter(config)
        self.experts = nn.ModuleList(
            [LongcatFlashMLP(config, intermediate_size=config.expert_ffn_hidden_size)
             for _ in range(config.n_routed_experts)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, weights, indices = self.router(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(x)
        for e in torch.unique(indices).tolist():
            token, slot = torch.where(indices == e)
            y = self.experts[e](x[token]) if e < self.num_routed else x[token]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out.reshape(shape)


class LongcatFlashNgramDecoderLayer(LongcatFlashDecoderLayer):
    """transformers' shortcut layer with the per-expert MoE."""

    def __init__(self, config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.mlp = LongcatFlashNgramMoE(config)
        self.self_attn = nn.ModuleList([LongcatFlashMLA(config=config, layer_idx=layer_idx * 2 + i) for i in (0, 1)])
        self.mlps = nn.ModuleList([LongcatFlashMLP(config) for _ in (0, 1)])
        self.input_layernorm = nn.ModuleList(
            [LongcatFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in (0, 1)]
        )
        self.post_attention_layernorm = nn.ModuleList(
            [LongcatFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in (0, 1)]
        )


# -------------------------------------------------------------------------------------- models
class NgramCache(DynamicCache):
    """DynamicCache that also carries the last ``N-1`` raw tokens for the n-gram hash."""

    ngram_context: torch.Tensor | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.ngram_context is not None:
            self.ngram_context = self.ngram_context.index_select(0, beam_idx.to(self.ngram_context.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.ngram_context is not None:
            self.ngram_context = self.ngram_context.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.ngram_context is not None:
            self.ngram_context = self.ngram_context[indices, ...]


class LongcatFlashNgramPreTrainedModel(LongcatFlashPreTrainedModel):
    config: LongcatFlashNgramConfig
    config_class = LongcatFlashNgramConfig
    _no_split_modules = ["LongcatFlashNgramDecoderLayer"]


class LongcatFlashNgramModel(LongcatFlashNgramPreTrainedModel, LongcatFlashModel):
    def __init__(self, config: LongcatFlashNgramConfig):
        LongcatFlashNgramPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.ngram_embeddings = NgramEmbedding(config)
        self.layers = nn.ModuleList(
            [LongcatFlashNgramDecoderLayer(config, i) for i in range(config.num_layers)]
        )
        self.norm = LongcatFlashRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LongcatFlashRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.head_dim = config.head_dim
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if input_ids is not None and inputs_embeds is None:
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if use_cache and past_key_values is None:
                past_key_values = NgramCache(config=self.config)
            context = None
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                context = getattr(past_key_values, "ngram_context", None)
            inputs_embeds = self.ngram_embeddings(input_ids, self.embed_tokens, context)
            if past_key_values is not None:
                full = input_ids if context is None else torch.cat([context, input_ids], dim=-1)
                past_key_values.ngram_context = full[..., -(self.config.emb_neighbor_num - 1):]
            input_ids = None
        return LongcatFlashModel.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )


class LongcatFlashNgramForCausalLM(LongcatFlashNgramPreTrainedModel, LongcatFlashForCausalLM):
    def __init__(self, config: LongcatFlashNgramConfig):
        LongcatFlashNgramPreTrainedModel.__init__(self, config)
        self.model = LongcatFlashNgramModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Use an :class:`NgramCache` where generate would build a plain DynamicCache."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = NgramCache(config=self.config.get_text_config(decoder=True))
        return result


__all__ = [
    "LongcatFlashNgramPreTrainedModel",
    "LongcatFlashNgramModel",
    "LongcatFlashNgramForCausalLM",
    "NgramEmbedding",
    "NgramCache",
]
