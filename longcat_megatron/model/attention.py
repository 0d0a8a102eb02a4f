"""Multi-head latent attention (MLA) with LongCat's scale correction, on megatron-core TP layers.

Tensors are ``[s, b, ...]`` (megatron layout). Under sequence parallelism the block input and output
are sequence shards ``[s/tp, b, H]``; the down projections gather the sequence and their (small)
latents are kept whole and identical on every TP rank, the up projections and the attention run on
this rank's heads, and the output projection reduce-scatters back to the sequence shard.

    q      = q_up(RMSNorm(q_down(x)))            per head [nope | rope]
    c, kr  = split(kv_down(x))                   latent, shared rope key
    k_nope, v = split(kv_up(RMSNorm(c) * a_kv))   per head
    q     *= a_q  (both parts);  kr not scaled;  RoPE (interleaved pairs) on q_rope and kr

Context parallelism (megatron's load-balanced split: CP rank r holds sequence chunks r and
2·CP−1−r of 2·CP): the key side is all-gathered over the CP group before the up projection, as the
small compressed tensors [RMSNorm(c)·a_kv | RoPE(kr)] (kv_lora + rope dims per token), restored to
global sequence order; local queries attend to all keys with the causal mask of their global
positions (or the dense mask, split on its query dim). The gather's backward sums the key
gradients of all CP ranks back to the owner of each token (reduce-scatter).

Packed documents: ``attention_mask`` is None (plain causal), a dense megatron mask, or a
:class:`~longcat_megatron.model.document_mask.DocumentMask` (document starts, no s x s tensor): one
causal attention per document piece, each query over its own document's keys up to itself; under
CP the same per local query chunk against the gathered keys.

Core attention (:func:`attend`): ``model.attention_backend`` "sdpa" (torch's fused kernels, v padded
to the q·k head dim so that they apply; no s x s tensor) or "eager" (explicit fp32 scores, the
reference). Selective recompute (``train.recompute: selective``, megatron's ``recompute_modules``):
"core_attn" checkpoints the core attention, "mla_up_proj" the up projections + RoPE (q, k, v freed
after the core attention and rebuilt before its backward). docs/model.md has the details and costs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.document_mask import DocumentMask
from longcat_megatron.model.norm import RMSNorm
from longcat_megatron.model.parallel_info import tp_size
from longcat_megatron.model.rotary import InterleavedRotary, softmax_scale


def context_parallel_size() -> int:
    """Context-parallel world size (1 when megatron's parallel state is not initialised)."""
    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def cp_global_positions(local_len: int, device=None) -> torch.Tensor:
    """Global sequence index ``[local_len]`` of each local position under megatron's load-balanced
    CP split (this rank holds chunks r and 2·CP−1−r); ``arange`` without CP."""
    cp = context_parallel_size()
    if cp == 1:
        return torch.arange(local_len, device=device)
    if local_len % 2:
        raise ValueError(f"context parallelism: local sequence length {local_len} must be even "
                         "(two chunks per CP rank); make data.seq_length divisible by 2 x "
                         "parallel.context")
    chunk = local_len // 2
    within = torch.arange(chunk, device=device)
    return torch.cat([g * chunk + within for g in cp_local_chunk_ids()])


def cp_local_chunk_ids() -> tuple[int, int]:
    """Indices (of 2·CP equal chunks of the sequence) of this rank's two chunks, in local order."""
    cp, rank = context_parallel_size(), ps.get_context_parallel_rank()
    return rank, 2 * cp - 1 - rank


def gather_sequence_over_cp(x: torch.Tensor) -> torch.Tensor:
    """``x [s_local, ...]`` of every CP rank -> ``[CP·s_local, ...]`` in global sequence order.
    Autograd: the backward sums the gradients of all CP ranks and returns each its own tokens."""
    cp = context_parallel_size()
    if cp == 1:
        return x
    gathered = tensor_parallel.gather_from_sequence_parallel_region(
        x.contiguous(), tensor_parallel_output_grad=True, group=ps.get_context_parallel_group())
    s_local = x.shape[0]
    chunk = s_local // 2
    # Rank r's block is [chunk r | chunk 2CP-1-r]: global chunk g lives at (rank, half) below.
    order = []
    for g in range(2 * cp):
        rank, half = (g, 0) if g < cp else (2 * cp - 1 - g, 1)
        start = rank * s_local + half * chunk
        order.append(torch.arange(start, start + chunk, device=x.device))
    return gathered.index_select(0, torch.cat(order))


def full_sequence_column(tf_config, in_size: int, out_size: int) -> ColumnParallelLinear:
    """Column-parallel linear whose input is already the full sequence (not a sequence shard):
    its input gradient is all-reduced over TP instead of reduce-scattered."""
    layer = ColumnParallelLinear(
        in_size, out_size, config=tf_config, init_method=tf_config.init_method,
        bias=False, gather_output=False, skip_bias_add=False,
    )
    layer.sequence_parallel = False
    layer.allreduce_dgrad = tp_size() > 1
    return layer


class LongcatMLA(MegatronModule):
    """Self-attention block: ``forward(x [s(/tp), b, H], rotary (cos, sin), attention_mask)``."""

    def __init__(self, cfg: ModelConfig, tf_config):
        super().__init__(config=tf_config)
        tp = tp_size()
        if cfg.num_attention_heads % tp:
            raise ValueError(f"model.num_attention_heads={cfg.num_attention_heads} is not divisible "
                             f"by the tensor-parallel size {tp}")
        if cfg.q_lora_rank % tp:
            raise ValueError(f"model.q_lora_rank={cfg.q_lora_rank} is not divisible by TP={tp}")
        if (cfg.kv_lora_rank + cfg.qk_rope_head_dim) % tp:
            raise ValueError(f"model.kv_lora_rank + model.qk_rope_head_dim = "
                             f"{cfg.kv_lora_rank + cfg.qk_rope_head_dim} is not divisible by TP={tp}")
        self.cfg = cfg
        self.heads_local = cfg.num_attention_heads // tp
        h = cfg.hidden_size
        # Down projections: sequence-parallel input, full (gathered) latent output.
        self.linear_q_down_proj = ColumnParallelLinear(
            h, cfg.q_lora_rank, config=tf_config, init_method=tf_config.init_method,
            bias=False, gather_output=True)
        self.q_layernorm = RMSNorm(cfg.q_lora_rank, cfg.mla_norm_epsilon, dtype=tf_config.params_dtype)
        self.linear_q_up_proj = full_sequence_column(
            tf_config, cfg.q_lora_rank, cfg.num_attention_heads * cfg.qk_head_dim)
        self.linear_kv_down_proj = ColumnParallelLinear(
            h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, config=tf_config,
            init_method=tf_config.init_method, bias=False, gather_output=True)
        self.kv_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.mla_norm_epsilon, dtype=tf_config.params_dtype)
        self.linear_kv_up_proj = full_sequence_column(
            tf_config, cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.v_head_dim, h, config=tf_config,
            init_method=tf_config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True)
        self.q_scale = math.sqrt(h / cfg.q_lora_rank) if cfg.mla_scale_q_lora else 1.0
        self.kv_scale = math.sqrt(h / cfg.kv_lora_rank) if cfg.mla_scale_kv_lora else 1.0
        self.softmax_scale = softmax_scale(cfg)

    # ---- recompute (megatron's selective granularity) ---------------------------------------
    def _recomputes(self, module: str) -> bool:
        """Whether ``module`` ("core_attn" / "mla_up_proj") is recomputed in this forward."""
        config = self.config
        return (self.training and torch.is_grad_enabled()
                and config.recompute_granularity == "selective"
                and module in (config.recompute_modules or ()))

    def forward(self, x: torch.Tensor, rotary, attention_mask: Optional[torch.Tensor] = None):
        cfg = self.cfg
        cos, sin = rotary
        q_latent, _ = self.linear_q_down_proj(x)                       # [s, b, q_lora]
        kv, _ = self.linear_kv_down_proj(x)                             # [s, b, kv_lora+rope]
        latent, k_rope = torch.split(kv, [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_layernorm(latent) * self.kv_scale
        # The shared rope key feeds this rank's heads only: sum its gradient over TP.
        k_rope = tensor_parallel.copy_to_tensor_model_parallel_region(k_rope)[:, :, None, :]
        k_rope = InterleavedRotary.rotate(k_rope, cos, sin)            # local (global) positions
        if context_parallel_size() > 1:
            keys = gather_sequence_over_cp(torch.cat([latent, k_rope[:, :, 0]], dim=-1))
            latent, k_rope = torch.split(keys, [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
            k_rope = k_rope[:, :, None, :]

        up_checkpoint = None
        if self._recomputes("mla_up_proj"):
            # Keep only the small latents; q, k, v are freed after the core attention and rebuilt
            # just before its backward (megatron's MLA does the same). Its ``fp8`` argument means
            # "an fp8 recipe is set" whenever it is not None: pass the config's (None by default).
            up_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
            query, key, value = up_checkpoint.checkpoint(
                self._up_project, q_latent, latent, k_rope, cos, sin)
        else:
            query, key, value = self._up_project(q_latent, latent, k_rope, cos, sin)
        if self._recomputes("core_attn"):
            if isinstance(attention_mask, DocumentMask):   # checkpoint saves tensor arguments only
                out = tensor_parallel.checkpoint(
                    lambda q, k, v: self._attention(q, k, v, attention_mask), False,
                    query, key, value)
            else:
                out = tensor_parallel.checkpoint(self._attention, False, query, key, value,
                                                 attention_mask)
        else:
            out = self._attention(query, key, value, attention_mask)   # [s, b, n_local*v]
        if up_checkpoint is not None:
            up_checkpoint.discard_output_and_register_recompute(out)
        out, _ = self.linear_proj(out)
        return out

    def _up_project(self, q_latent, latent, k_rope, cos, sin):
        """Latents -> per-head ``query, key [s, b, n_local, nope+rope]`` and ``value [s_k, b,
        n_local, v]`` (q-LoRA up projection with its norm and scale, RoPE on the query's rope
        part, kv up projection, the shared rotated rope key appended to every head's key)."""
        cfg = self.cfg
        q, _ = self.linear_q_up_proj(self.q_layernorm(q_latent))        # [s, b, n*(nope+rope)]
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads_local, cfg.qk_head_dim) * self.q_scale
        q_nope, q_rope = torch.split(q, [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rope = InterleavedRotary.rotate(q_rope, cos, sin)
        query = torch.cat([q_nope, q_rope], dim=-1)
        kv_up, _ = self.linear_kv_up_proj(latent)                       # [s_k, b, n*(nope+v)]
        kv_up = kv_up.view(kv_up.shape[0], b, self.heads_local, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, value = torch.split(kv_up, [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_rope.expand(-1, -1, self.heads_local, -1)], dim=-1)
        return query, key, value

    def _attention(self, q, k, v, attention_mask):
        """Core attention ``[s_q, b, heads, d] -> [s_q, b, heads·v]``: causal over the whole
        sequence, or under context parallelism this rank's two query chunks over all keys."""
        if context_parallel_size() > 1:
            return self._chunked_attention(q, k, v, attention_mask)
        s = q.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))             # [b, n, s, d]
        if isinstance(attention_mask, DocumentMask):
            out = self._attend_documents(q, k, v, attention_mask, 0)
        else:
            out = self._attend(q, k, v, attention_mask)                    # [b, n, s, dv]
        return out.permute(2, 0, 1, 3).reshape(s, out.shape[0], -1)

    def _chunked_attention(self, q, k, v, attention_mask):
        """Context-parallel attention: local queries ``[s_q, b, heads, d]`` (two sequence chunks)
        over all keys ``[CP·s_q, b, ...]`` in global order, one call per chunk (no ``s_q x s_k``
        score tensor with SDPA). Causal: chunk g sees keys ``[0, (g+1)·c)`` with the
        bottom-right-aligned causal mask; a megatron mask ``[b, 1, s_q, s_k]`` (masked out: True,
        or -inf when additive; split on its query dim only) or a ``DocumentMask`` (whole
        sequence) replaces it when given."""
        s_q, s_k = q.shape[0], k.shape[0]
        documents = attention_mask if isinstance(attention_mask, DocumentMask) else None
        if documents is not None:
            attention_mask = None
        elif attention_mask is not None and tuple(attention_mask.shape[-2:]) != (s_q, s_k):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not match {s_q} local "
                f"queries x {s_k} keys; under context parallelism split it on its query dim only "
                "(megatron get_batch_on_this_cp_rank)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))             # [b, n, s, d]
        chunk = s_q // 2
        outs = []
        for half, g in enumerate(cp_local_chunk_ids()):
            rows = slice(half * chunk, (half + 1) * chunk)
            if documents is not None:
                outs.append(self._attend_documents(q[:, :, rows], k, v, documents, g * chunk))
            elif attention_mask is None:
                end = (g + 1) * chunk
                outs.append(self._attend(q[:, :, rows], k[:, :, :end], v[:, :, :end], None))
            else:
                outs.append(self._attend(q[:, :, rows], k, v, attention_mask[..., rows, :]))
        out = torch.cat(outs, dim=2)                                      # [b, n, s_q, dv]
        return out.permute(2, 0, 1, 3).reshape(s_q, out.shape[0], -1)

    def _attend_documents(self, q, k, v, documents: DocumentMask, query_start: int):
        """Queries ``[b, n, s_q, d]`` at global positions ``query_start + [0, s_q)`` over keys and
        values ``[b, n, s_k, ...]`` (global positions from 0) inside each query's document: one
        bottom-right causal attention per document piece (flash kernels stay usable, no s x s
        tensor). Samples of one layout share each call."""
        s_q = q.shape[2]
        if (documents.batch_size, documents.seq_length) != (q.shape[0], k.shape[2]):
            raise ValueError(
                f"DocumentMask of {documents.batch_size} samples x {documents.seq_length} tokens does "
                f"not match the micro-batch ({q.shape[0]} x {k.shape[2]} keys); it describes the "
                "whole sequence (keep it out of get_batch_on_this_cp_rank)")
        samples = [slice(None)] if documents.same_for_every_sample else \
            [slice(i, i + 1) for i in range(q.shape[0])]
        outs = []
        for rows in samples:
            pieces = documents.pieces(0 if rows.start is None else rows.start,
                                      query_start, query_start + s_q)
            parts = [self._attend(q[rows, :, lo - query_start:hi - query_start],
                                  k[rows, :, key_start:hi], v[rows, :, key_start:hi], None)
                     for key_start, lo, hi in pieces]
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _attend(self, q, k, v, mask):
        """Softmax attention ``[b, n, s_q, d]`` x ``[b, n, s_k, d|dv] -> [b, n, s_q, dv]``.
        ``mask`` None: causal, bottom-right aligned (``s_q <= s_k``; the plain causal mask when
        equal); else a megatron mask (bool, True = masked out) or an additive float mask."""
        dropout = self.cfg.attention_dropout if self.training else 0.0
        if dropout > 0:
            # Dropout draws from the model-parallel RNG stream (megatron's DotProductAttention),
            # which activation recompute restores.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend(q, k, v, mask, self.softmax_scale, dropout, self.cfg.attention_backend)
        return attend(q, k, v, mask, self.softmax_scale, 0.0, self.cfg.attention_backend)


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A megatron bool mask (True = masked out) as the additive float mask (0 / -inf) SDPA's fused
    kernels take; float masks, None and a ``DocumentMask`` pass through. Convert once per forward
    and share it: SDPA would otherwise convert (and keep for backward) a float copy in every
    attention call."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attend(q, k, v, mask, scale: float, dropout: float = 0.0, backend: str = "sdpa"):
    """Scaled softmax attention ``[b, n, s_q, d] x [b, n, s_k, d|dv] -> [b, n, s_q, dv]`` with the
    given ``scale``; ``mask`` as in :meth:`LongcatMLA._attend`.

    ``sdpa``: ``F.scaled_dot_product_attention``. Its fused kernels (flash on CPU and CUDA) want
    equal q·k and v head dims and otherwise silently fall back to the math path that builds the
    ``s x s`` scores; so the smaller side is zero-padded (v to the q·k dim for MLA; padding q and k
    leaves every score unchanged) and the output sliced back. ``eager``: explicit fp32 scores and
    softmax (the reference; memory quadratic in the sequence)."""
    s_q, s_k = q.shape[-2], k.shape[-2]
    if backend == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if mask is None:
            mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        return torch.matmul(probs, v)
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    kwargs = dict(scale=scale, dropout_p=dropout)
    if mask is not None:
        kwargs["attn_mask"] = ~mask if mask.dtype == torch.bool else mask
    elif s_q == s_k:
        kwargs["is_causal"] = True
    else:
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(s_q, s_k)
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out[..., :dv] if dv < d else out
