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
:class:`~longcat_megatron.model.document_mask.DocumentMask` (document starts, no s x s tensor): each
query over its own document's keys up to itself; under CP the same per local query chunk against the
gathered keys. On CUDA (bf16/fp16, head dims up to 256) all documents of a micro-batch go to torch's
flash varlen kernel in one call (:func:`document_attention_path`); elsewhere, and when
``LONGCAT_DOCUMENT_ATTENTION=pieces``, one causal SDPA call per document piece.

Core attention (:func:`attend`): ``model.attention_backend`` "sdpa" (torch's fused kernels, v padded
to the q·k head dim so that they apply; no s x s tensor) or "eager" (explicit fp32 scores, the
reference). Selective recompute (``train.recompute: selective``, megatron's ``recompute_modules``):
"core_attn" checkpoints the core attention, "mla_up_proj" the up projections + RoPE (q, k, v freed
after the core attention and rebuilt before its backward). docs/model.md has the details and costs.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from typing import Callable, Optional

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
        if isinstance(attention_mask, DocumentMask):
            return self._document_attention(q, k, v, attention_mask, [(0, 0, s)])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))             # [b, n, s, d]
        out = self._attend(q, k, v, attention_mask)                        # [b, n, s, dv]
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
        chunk = s_q // 2
        if documents is not None:
            return self._document_attention(
                q, k, v, documents,
                [(g * chunk, half * chunk, chunk) for half, g in enumerate(cp_local_chunk_ids())])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))             # [b, n, s, d]
        outs = []
        for half, g in enumerate(cp_local_chunk_ids()):
            rows = slice(half * chunk, (half + 1) * chunk)
            if attention_mask is None:
                end = (g + 1) * chunk
                outs.append(self._attend(q[:, :, rows], k[:, :, :end], v[:, :, :end], None))
            else:
                outs.append(self._attend(q[:, :, rows], k, v, attention_mask[..., rows, :]))
        out = torch.cat(outs, dim=2)                                      # [b, n, s_q, dv]
        return out.permute(2, 0, 1, 3).reshape(s_q, out.shape[0], -1)

    def _document_attention(self, q, k, v, documents: DocumentMask, chunks: list):
        """Per-document attention of the local queries ``q [s_q, b, heads, d]`` over the keys and
        values ``[s_k, b, heads, ...]`` of the whole sequence (global positions from 0) ->
        ``[s_q, b, heads·dv]``. ``chunks``: ``(global_start, local_start, length)`` of each run of
        consecutive global query positions in ``q`` (one without CP, this rank's two under CP).
        One flash varlen call for the micro-batch where :func:`document_attention_path` allows it
        (per chunk and sample under CP), else one SDPA call per document piece."""
        if (documents.batch_size, documents.seq_length) != (q.shape[1], k.shape[0]):
            raise ValueError(
                f"DocumentMask of {documents.batch_size} samples x {documents.seq_length} tokens does "
                f"not match the micro-batch ({q.shape[1]} x {k.shape[0]} keys); it describes the "
                "whole sequence (keep it out of get_batch_on_this_cp_rank)")
        dropout = self.cfg.attention_dropout if self.training else 0.0
        path, _ = document_attention_path(q, max(q.shape[-1], v.shape[-1]), dropout,
                                          self.cfg.attention_backend)
        if path == "varlen":
            out = varlen_document_attention(q, k, v, documents, chunks, self.softmax_scale)
            return out.reshape(q.shape[0], q.shape[1], -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))             # [b, n, s, d]
        outs = [self._attend_documents(q[:, :, local:local + length], k, v, documents, start)
                for start, local, length in chunks]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)       # [b, n, s_q, dv]
        return out.permute(2, 0, 1, 3).reshape(q.shape[2], out.shape[0], -1)

    def _attend_documents(self, q, k, v, documents: DocumentMask, query_start: int):
        """Queries ``[b, n, s_q, d]`` at global positions ``query_start + [0, s_q)`` over keys and
        values ``[b, n, s_k, ...]`` (global positions from 0) inside each query's document: one
        bottom-right causal attention per document piece (flash kernels stay usable, no s x s
        tensor). Samples of one layout share each call."""
        s_q = q.shape[2]
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


# ---- per-document attention in one call: torch's flash varlen kernel -------------------------------
DOCUMENT_ATTENTION_ENV = "LONGCAT_DOCUMENT_ATTENTION"
DOCUMENT_ATTENTION_MODES = ("auto", "varlen", "pieces")
VARLEN_MAX_HEAD_DIM = 256   # torch's flash kernels: head dims up to 256, multiples of 8
_document_mode: list = []     # stack of document_attention() overrides: (mode, kernel)


def _check_mode(mode: str) -> str:
    if mode not in DOCUMENT_ATTENTION_MODES:
        raise ValueError(f"{DOCUMENT_ATTENTION_ENV}={mode!r}: use one of "
                         f"{', '.join(DOCUMENT_ATTENTION_MODES)}")
    return mode


@contextlib.contextmanager
def document_attention(mode: str, kernel: Optional[Callable] = None):
    """Within the block, per-document attention runs as ``mode``: "auto" (varlen where
    :func:`document_attention_path` allows it, the default), "varlen" (also off CUDA / in fp32:
    for tests and benches) or "pieces" (one SDPA call per document piece). ``kernel`` replaces
    torch's ``varlen_attn`` (tests and ``gpu_check --cpu`` pass :func:`varlen_reference`). Outside
    any block the mode is ``$LONGCAT_DOCUMENT_ATTENTION`` (default "auto")."""
    _document_mode.append((_check_mode(mode), kernel))
    try:
        yield
    finally:
        _document_mode.pop()


def _current_mode() -> tuple:
    if _document_mode:
        return _document_mode[-1]
    return _check_mode(os.environ.get(DOCUMENT_ATTENTION_ENV, "auto") or "auto"), None


def varlen_kernel() -> Optional[Callable]:
    """The varlen attention to call: a :func:`document_attention` override, else torch's
    ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), else None."""
    override = _current_mode()[1]
    if override is not None:
        return override
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_refusal(mode: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: float,
                   backend: str, capability: Optional[tuple] = None) -> Optional[str]:
    """Why per-document attention cannot take the varlen kernel (None: it can). The semantic
    limits hold in every mode: the ``eager`` backend is the explicit-score reference, and
    ``varlen_attn`` has no dropout. The hardware limits of torch's flash kernel (CUDA, compute
    capability >= 8.0, bf16/fp16, the padded head dim at most 256 and a multiple of 8) are
    checked in "auto" only; "varlen" skips them (tests run it on CPU with a stand-in kernel)."""
    if mode == "pieces":
        return f"{DOCUMENT_ATTENTION_ENV}=pieces"
    if backend != "sdpa":
        return f"model.attention_backend={backend}"
    if dropout > 0:
        return "attention dropout (varlen_attn has none)"
    if mode == "varlen":
        return None
    if device_type != "cuda":
        return f"{device_type} (the flash varlen kernel is CUDA-only)"
    if capability is not None and tuple(capability) < (8, 0):
        return f"compute capability {capability[0]}.{capability[1]} < 8.0"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} (flash needs bf16/fp16)"
    if head_dim > VARLEN_MAX_HEAD_DIM or head_dim % 8:
        return f"head dim {head_dim} (flash: at most {VARLEN_MAX_HEAD_DIM}, a multiple of 8)"
    return None


def document_attention_path(q: torch.Tensor, head_dim: int, dropout: float,
                            backend: str) -> tuple[str, Optional[str]]:
    """``("varlen", None)`` or ``("pieces", why)`` for queries ``q`` whose q·k / v head dims pad to
    ``head_dim`` (:func:`varlen_refusal` has the rules)."""
    mode = _current_mode()[0]
    capability = None
    if mode == "auto" and q.is_cuda:
        capability = torch.cuda.get_device_capability(q.device)
    why = varlen_refusal(mode, q.device.type, q.dtype, head_dim, dropout, backend, capability)
    if why is None and varlen_kernel() is None:
        why = f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return ("pieces", why) if why else ("varlen", None)


def varlen_segments(documents: DocumentMask, samples: range, query_start: int, query_end: int,
                    key_length: int) -> Optional[tuple]:
    """The varlen kernel's view of the queries at global positions ``[query_start, query_end)`` of
    ``samples`` over the keys ``[0, key_length)`` of those samples, both packed sample after sample
    (``[len(samples)·(query_end - query_start)]`` queries, ``[len(samples)·key_length]`` keys):
    ``(cu_q, cu_k, max_q, max_k, key_lo, key_hi)`` with one segment per document piece (Python
    ints; ``cu_k`` relative to packed key ``key_lo``; only keys ``[key_lo, key_hi)`` are read).
    Each segment is causal bottom-right aligned: query ``p`` of a piece sees its document's keys up
    to ``p`` (:meth:`DocumentMask.pieces`). None when the key ranges of consecutive pieces are not
    adjacent (under CP with more than one sample: each sample's key range starts before its query
    chunk), i.e. one call cannot express them."""
    span = query_end - query_start
    cu_q, cu_k = [0], []
    max_q = max_k = 0
    key_hi = None
    for n, sample in enumerate(samples):
        for key_start, lo, hi in documents.pieces(sample, query_start, query_end):
            k_lo, k_hi = n * key_length + key_start, n * key_length + hi
            if key_hi is not None and k_lo != key_hi:
                return None
            if not cu_k:
                cu_k.append(k_lo)
            cu_q.append(n * span + hi - query_start)
            cu_k.append(k_hi)
            key_hi = k_hi
            max_q, max_k = max(max_q, hi - lo), max(max_k, hi - key_start)
    key_lo = cu_k[0]
    return cu_q, [c - key_lo for c in cu_k], max_q, max_k, key_lo, key_hi


# cu_seqlens tensors per DocumentMask (equal masks share them), device and query range: every layer
# of a micro-batch asks for the same ones.
_cu_cache: "weakref.WeakKeyDictionary[DocumentMask, dict]" = weakref.WeakKeyDictionary()


def _varlen_call_plan(documents: DocumentMask, chunks: list, batch: int, key_length: int,
                      device) -> list:
    """One ``(chunk index, samples, cu_q, cu_k, max_q, max_k, key_lo, key_hi)`` per kernel call:
    one for the micro-batch when the queries are the whole sequence, else one per chunk (and per
    sample when its keys are not adjacent to the previous sample's)."""
    key = (str(device), tuple(chunks), batch, key_length)
    per_mask = _cu_cache.setdefault(documents, {})
    if key not in per_mask:
        plan = []
        for index, (start, _, length) in enumerate(chunks):
            whole = varlen_segments(documents, range(batch), start, start + length, key_length)
            calls = [(range(batch), whole)] if whole is not None else [
                (range(i, i + 1), varlen_segments(documents, range(i, i + 1), start, start + length,
                                                  key_length)) for i in range(batch)]
            for samples, (cu_q, cu_k, max_q, max_k, key_lo, key_hi) in calls:
                cu = torch.tensor([cu_q, cu_k], dtype=torch.int32).to(device)
                plan.append((index, samples, cu[0], cu[1], max_q, max_k, key_lo, key_hi))
        per_mask[key] = plan
    return per_mask[key]


def varlen_document_attention(q, k, v, documents: DocumentMask, chunks: list, scale: float,
                              kernel: Optional[Callable] = None) -> torch.Tensor:
    """Per-document causal attention in as few varlen kernel calls as the layout allows: queries
    ``q [s_q, b, n, d]`` (``chunks`` as in :meth:`LongcatMLA._document_attention`) over keys ``k``
    and values ``v [s_k, b, n, d|dv]`` -> ``[s_q, b, n, dv]``. The smaller of the q·k and v head
    dims is zero-padded (the kernel wants one head dim; exact, as in :func:`attend`)."""
    kernel = kernel or varlen_kernel()
    s_q, b, n, d = q.shape
    s_k, dv = k.shape[0], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    width = v.shape[-1]
    packed = {}                                     # sample range -> packed [b·s, n, D] tensors

    def pack(t: torch.Tensor, samples: range) -> torch.Tensor:
        t = t[:, samples.start:samples.stop]
        return t.transpose(0, 1).reshape(-1, n, t.shape[-1])          # a view when one sample

    outs: dict = {}
    for index, samples, cu_q, cu_k, max_q, max_k, key_lo, key_hi in _varlen_call_plan(
            documents, chunks, b, s_k, q.device):
        _, local, length = chunks[index]
        if samples not in packed:
            packed[samples] = (pack(k, samples), pack(v, samples))
        keys, values = packed[samples]
        queries = pack(q[local:local + length], samples)
        out = kernel(queries.contiguous(), keys[key_lo:key_hi].contiguous(),
                     values[key_lo:key_hi].contiguous(), cu_q, cu_k, max_q, max_k,
                     scale=scale, window_size=(-1, 0))                  # [len(samples)·length, n, D]
        out = out[..., :dv].reshape(len(samples), length, n, dv).transpose(0, 1)
        outs.setdefault(index, []).append(out)
    parts = [torch.cat(outs[i], dim=1) if len(outs[i]) > 1 else outs[i][0] for i in range(len(chunks))]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)    # [s_q, b, n, dv]


def varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     window_size=(-1, -1), **unused):
    """What ``torch.nn.attention.varlen.varlen_attn`` computes, one SDPA call per segment, with its
    input contract asserted (one head dim for q, k and v, contiguous last dims, int32 cu_seqlens
    from 0 to the packed lengths, segment lengths within max_q / max_k; causal =
    ``window_size == (-1, 0)``, bottom-right aligned as flash's). The CPU stand-in of tests and
    ``gpu_check --cpu``."""
    from torch.nn.attention.bias import causal_lower_right

    assert query.dim() == key.dim() == value.dim() == 3, (query.shape, key.shape, value.shape)
    assert query.shape[-1] == key.shape[-1] == value.shape[-1], "one head dim for q, k and v"
    assert all(t.stride(-1) == 1 for t in (query, key, value))
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and len(cu_seq_q) == len(cu_seq_k)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    assert cq[0] == ck[0] == 0 and cq[-1] == query.shape[0] and ck[-1] == key.shape[0], (cq, ck)
    causal = tuple(window_size) == (-1, 0)
    assert causal or tuple(window_size) == (-1, -1)
    outs = []
    for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:]):
        assert 0 < q1 - q0 <= max_q and 0 < k1 - k0 <= max_k and q1 - q0 <= k1 - k0
        q_, k_, v_ = (t[a:e].transpose(0, 1) for t, a, e in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        mask = causal_lower_right(q1 - q0, k1 - k0) if causal else None
        outs.append(F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


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
