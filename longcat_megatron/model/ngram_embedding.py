"""Vocab-sharded N-gram Embedding (LongCat-Flash-Lite input embedding) as a megatron-core module.

Usage (drop-in for megatron's ``LanguageModelEmbedding`` without position embeddings)::

    emb = NgramEmbedding(tf_config, vocab_size, ngram_cfg, max_sequence_length)
    hidden = emb(input_ids, position_ids)        # input_ids [b, s] -> [s, b, h]
                                                 # ([s/TP, b, h] under sequence parallelism)

Output = mean of the 1 + K(N-1) vectors ``word_embeddings(t)`` and ``post_projs[i](E_i(id_i(t)))``
(released form), optionally amplified (``ngram_cfg.amplification``: x sqrt(H) or a LayerNorm).

Parameters (HF names in brackets; T = K(N-1) sub-tables of width D = H/T):
  * ``word_embeddings.weight``   megatron VocabParallelEmbedding, rows over TP [model.embed_tokens]
  * ``ngram_tables``             all T sub-tables concatenated by rows, this rank's contiguous row
                                 range only; sub-table i = global rows ``table_row_ranges()[i]``
                                 [model.ngram_embeddings.embedders.{i}.weight, M_i x D]
  * ``post_projs.{i}.weight``    [H, D], replicated [model.ngram_embeddings.post_projs.{i}.weight]
  * ``output_norm``              only with amplification='layernorm' (not in released checkpoints)

Sharding of ``ngram_tables`` (``ngram_cfg.partition``):
  * ``tensor``: rows over the TP group; masked local lookup, all-reduce of the looked-up rows
    (reduce-scatter to the sequence-parallel layout under SP). The shards are ordinary dense params,
    replicated over DP x CP: megatron DDP averages their gradients over DP x CP and the distributed
    optimizer shards their optimizer state over DP.
  * ``tensor_data``: rows over megatron's expert-tensor x expert-model-parallel group (with EP = DP
    and expert-TP = TP that is the whole TP x DP group). Each rank looks up the rows for its own
    sequence-parallel slice of the tokens (distinct tokens on every rank), the ids go to the owning
    ranks and the rows come back by all-to-all, and backward routes every token's gradient to the
    owner. The shards carry ``allreduce = False`` so megatron DDP and the optimizer treat them like
    expert weights: gradients reduced only over the expert-data-parallel group (the ranks that hold
    the same rows; size 1 when the group spans all of TP x DP x CP), optimizer state sharded there.
Under SP the projections run on the local sequence slice; their weights carry
``sequence_parallel = True`` so megatron's ``finalize_model_grads`` sums their gradients over TP.

Context parallelism: each rank's ids need the N-1 tokens before each of its chunks. The module
all-gathers the (small) input ids over the CP group and assumes megatron's load-balanced split
(``megatron.core.utils.get_batch_on_this_cp_rank``: chunks r and 2CP-1-r). Cached decode passes the
previous N-1 tokens as ``ngram_context``.

Per-layer N-gram Embedding (``model.per_layer_embedding: plne``, model/per_layer_embedding.py):
``output_width=F`` sets the width (tables F/T wide, projections [F, F/T]), ``column_output=True``
returns ``[s, b, F/TP]`` (the whole sequence, this TP rank's columns: a ColumnParallelLinear's
layout) by computing the whole embedding as without SP and splitting its columns, and
``init_stream`` gives each layer its own initial values. ``table_rows`` (the hash) can be computed
once and passed to several modules of one shape as ``forward(..., rows=)``.

Checkpoints: ``sharded_state_dict`` saves ``ngram_tables`` as one [sum M_i, D] tensor sharded by row
ranges, so it loads under any TP / partition / group size; the ShardedTensor wraps the parameter
itself so optimizer state follows the same sharding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from longcat_megatron.model.ngram_config import NgramConfig, NgramConfigError, check_ngram_rules
from longcat_megatron.model.ngram_ids import ngram_ids

INIT_BLOCK_ROWS = 4096  # rows per independently seeded init block (init is sharding-independent)


def even_row_split(total_rows: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each part when ``total_rows`` are split as evenly as possible (first parts
    one longer)."""
    base, rem = divmod(total_rows, parts)
    bounds, start = [], 0
    for r in range(parts):
        end = start + base + (1 if r < rem else 0)
        bounds.append((start, end))
        start = end
    return bounds


def row_owner(rows: Tensor, total_rows: int, parts: int) -> Tensor:
    """Owning part of each global row under :func:`even_row_split`."""
    base, rem = divmod(total_rows, parts)
    big = rem * (base + 1)
    return torch.where(rows < big, rows // (base + 1), rem + (rows - big) // max(base, 1))


class _TableLookup(torch.autograd.Function):
    """``F.embedding(ids, table)`` whose backward, when megatron DDP has given the table a
    ``main_grad`` buffer, adds the row gradients straight into it (O(tokens), like megatron's
    gradient-accumulation fusion for linear layers) and hands autograd an empty sparse gradient
    instead of a dense [rows, D] one. Without DDP it returns the ordinary dense gradient."""

    @staticmethod
    def forward(ctx, table, ids):
        ctx.save_for_backward(ids)
        ctx.table = table
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        (ids,) = ctx.saved_tensors
        table = ctx.table
        flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        main_grad = getattr(table, "main_grad", None)
        if main_grad is not None and hasattr(table, "grad_added_to_main_grad"):
            main_grad.index_add_(0, flat_ids, flat_grad.to(main_grad.dtype))
            table.grad_added_to_main_grad = True
            empty = torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.int64, device=grad.device),
                torch.zeros(0, table.shape[1], dtype=table.dtype, device=grad.device),
                table.shape,
                check_invariants=False,
                is_coalesced=True,
            )
            return empty, None
        dense = torch.zeros_like(table)
        dense.index_add_(0, flat_ids, flat_grad.to(table.dtype))
        return dense, None


class NgramEmbedding(MegatronModule):
    """LongCat-Flash-Lite N-gram Embedding; see the module docstring for layout and sharding."""

    def __init__(
        self,
        config,
        vocab_size: int,
        ngram: NgramConfig,
        max_sequence_length: int,
        tp_group: Optional[dist.ProcessGroup] = None,
        *,
        output_width: Optional[int] = None,
        column_output: bool = False,
        init_stream: int = 0,
    ):
        super().__init__(config=config)
        hidden = output_width or config.hidden_size
        if column_output:   # the per-layer N-gram Embedding (model/per_layer_embedding.py)
            check_ngram_rules(ngram, _Shape(vocab_size, hidden), section="model.per_layer_ngram",
                              width_field="model.ffn_hidden_size")
        else:
            check_ngram_rules(ngram, _Shape(vocab_size, hidden))  # errors only
        self.ngram = ngram
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.tp_group = tp_group or ps.get_tensor_model_parallel_group()
        self.output_width = hidden
        self.column_output = column_output
        # The column layout computes the whole [s, b, width] on every TP rank (no SP sharding).
        self.sequence_parallel = bool(config.sequence_parallel) and not column_output
        self.num_tables = ngram.num_tables
        self.table_width = hidden // self.num_tables
        self.moduli = ngram.moduli(vocab_size)
        offsets = [0]
        for m in self.moduli:
            offsets.append(offsets[-1] + m)
        self.total_rows = offsets[-1]
        self._row_offsets = offsets[:-1]   # python ints: usable when the module is on meta
        self.register_buffer(
            "table_offsets", torch.tensor(offsets[:-1], dtype=torch.int64), persistent=False
        )

        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size,
            embedding_dim=hidden,
            init_method=config.embedding_init_method,
            reduce_scatter_embeddings=self.sequence_parallel,
            config=config,
            tp_group=self.tp_group,
        )

        if ngram.partition == "tensor":
            self.shard_group = self.tp_group
            self.replica_group = ps.get_data_parallel_group(with_context_parallel=True)
        else:
            self.shard_group = ps.get_expert_tensor_and_model_parallel_group()
            self.replica_group = ps.get_expert_data_parallel_group()
        self.shard_size = self.shard_group.size()
        self.shard_rank = self.shard_group.rank()
        if self.total_rows < self.shard_size:
            raise NgramConfigError(
                f"model.ngram: {self.total_rows} table rows cannot be split over {self.shard_size} ranks"
            )
        self.row_start, self.row_end = even_row_split(self.total_rows, self.shard_size)[self.shard_rank]

        # megatron's convention: CPU init -> no explicit device (so a torch.device('meta') context,
        # e.g. the parameter summary, allocates nothing)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.ngram_tables = torch.nn.Parameter(
            torch.empty(self.row_end - self.row_start, self.table_width,
                        dtype=config.params_dtype, device=device)
        )
        tensor_parallel.set_tensor_model_parallel_attributes(self.ngram_tables, True, 0, 1)
        self.ngram_tables.row_shard = (self.row_start, self.row_end)   # for parallel_slicing.shard
        if ngram.partition == "tensor_data":
            self.ngram_tables.allreduce = False
        self.post_projs = torch.nn.ModuleList(
            torch.nn.Linear(self.table_width, hidden, bias=False, device=device,
                            dtype=config.params_dtype)
            for _ in range(self.num_tables)
        )
        self.output_norm = None
        if ngram.amplification == "layernorm":
            self.output_norm = torch.nn.LayerNorm(hidden, eps=config.layernorm_epsilon,
                                                  device=device, dtype=config.params_dtype)
        for p in list(self.post_projs.parameters()) + (
            list(self.output_norm.parameters()) if self.output_norm is not None else []
        ):
            p.sequence_parallel = self.sequence_parallel
        if config.perform_initialization:
            self.reset_ngram_parameters(init_seed(torch.initial_seed(), init_stream))
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    # ------------------------------------------------------------------------------ weights layout
    def table_row_ranges(self) -> list[tuple[int, int]]:
        """Global [start, end) rows of each sub-table inside the concatenated table."""
        offs = self._row_offsets
        return [(o, o + m) for o, m in zip(offs, self.moduli)]

    def local_table_slices(self) -> list[tuple[int, int, int, int]]:
        """Pieces of the sub-tables held here: (table idx, row start, row end inside that sub-table,
        row offset inside ``ngram_tables``). Lets a loader read only the local rows."""
        pieces = []
        for i, (a, b) in enumerate(self.table_row_ranges()):
            lo, hi = max(a, self.row_start), min(b, self.row_end)
            if lo < hi:
                pieces.append((i, lo - a, hi - a, lo - self.row_start))
        return pieces

    @torch.no_grad()
    def load_full_weights(self, word_embeddings: Tensor, tables: list, projections: list) -> None:
        """Copy this rank's shards from full weights: word_embeddings [V, H], tables[i] [M_i, D],
        projections[i] [H, D] (HF layout)."""
        we = self.word_embeddings
        self.word_embeddings.weight.copy_(word_embeddings[we.vocab_start_index: we.vocab_end_index])
        for i, a, b, off in self.local_table_slices():
            self.ngram_tables[off: off + b - a].copy_(tables[i][a:b])
        for proj, w in zip(self.post_projs, projections):
            proj.weight.copy_(w)

    @torch.no_grad()
    def reset_ngram_parameters(self, seed: int) -> None:
        """Normal(0, embedding_init_method_std) init of the tables, Normal(0, init_method_std) of the
        projections (equal unless ``transfer`` scales the hidden std). Every block of
        INIT_BLOCK_ROWS global rows has its own seed, so the values do not depend on the sharding."""
        std = self.config.embedding_init_method_std
        first = self.row_start // INIT_BLOCK_ROWS
        last = (self.row_end - 1) // INIT_BLOCK_ROWS
        for block in range(first, last + 1):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
            vals = torch.randn(INIT_BLOCK_ROWS, self.table_width, generator=gen) * std
            b0 = block * INIT_BLOCK_ROWS
            lo, hi = max(b0, self.row_start), min(b0 + INIT_BLOCK_ROWS, self.row_end)
            self.ngram_tables[lo - self.row_start: hi - self.row_start].copy_(vals[lo - b0: hi - b0])
        for i, proj in enumerate(self.post_projs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + i)
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * self.config.init_method_std)

    # ----------------------------------------------------------------------------------- ids
    def compute_ngram_ids(self, input_ids: Tensor, ngram_context: Optional[Tensor] = None) -> Tensor:
        """[T, b, s] n-gram ids (row inside each sub-table) of this rank's tokens."""
        kw = dict(vocab_size=self.vocab_size, ratio=self.ngram.ngram_vocab_size_ratio,
                  max_n=self.ngram.emb_neighbor_num, splits=self.ngram.emb_split_num,
                  eos_token_id=self.ngram.eos_token_id)
        cp = ps.get_context_parallel_world_size() if ngram_context is None else 1
        if cp == 1:
            return ngram_ids(input_ids, left_context=ngram_context, **kw)
        return self._cp_ngram_ids(input_ids, cp, kw)

    def _cp_ngram_ids(self, input_ids: Tensor, cp: int, kw: dict) -> Tensor:
        group = ps.get_context_parallel_group()
        rank = ps.get_context_parallel_rank()
        b, s_local = input_ids.shape
        if s_local % 2:
            raise ValueError(f"NgramEmbedding: CP chunk length {s_local} must be even (2 chunks per rank)")
        chunk = s_local // 2
        parts = [torch.empty_like(input_ids) for _ in range(cp)]
        dist.all_gather(parts, input_ids.contiguous(), group=group)
        full = input_ids.new_empty(b, 2 * cp, chunk)
        for r, part in enumerate(parts):
            halves = part.view(b, 2, chunk)
            full[:, r] = halves[:, 0]
            full[:, 2 * cp - 1 - r] = halves[:, 1]
        full = full.view(b, 2 * cp * chunk)
        back = self.ngram.emb_neighbor_num - 1
        out = []
        for c in (rank, 2 * cp - 1 - rank):
            start = c * chunk
            ctx = full[:, max(0, start - back): start]
            out.append(ngram_ids(full[:, start: start + chunk], left_context=ctx, **kw))
        return torch.cat(out, dim=2)

    # ------------------------------------------------------------------------------- lookups
    def _lookup_tensor(self, rows: Tensor) -> Tensor:
        """rows [s, b, T] global -> [s', b, T*D] summed over TP (s' = s/TP under SP)."""
        s, b, t = rows.shape
        if self.shard_size > 1:
            outside = (rows < self.row_start) | (rows >= self.row_end)
            local = torch.where(outside, torch.zeros_like(rows), rows - self.row_start)
            emb = _TableLookup.apply(self.ngram_tables, local)
            emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            emb = _TableLookup.apply(self.ngram_tables, rows)
        emb = emb.reshape(s, b, t * self.table_width)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(emb, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(emb, group=self.tp_group)

    def _lookup_exchange(self, rows: Tensor) -> Tensor:
        """rows [s, b, T] global -> [s', b, T*D] via all-to-all with the owning ranks."""
        tp = self.tp_group.size()
        if tp > 1:
            if rows.shape[0] % tp:
                raise ValueError(
                    f"NgramEmbedding(partition='tensor_data'): sequence length {rows.shape[0]} per "
                    f"rank must be divisible by tensor parallel size {tp}"
                )
            rows = rows.chunk(tp, dim=0)[self.tp_group.rank()]
        s, b, t = rows.shape
        uniq, inverse = torch.unique(rows.reshape(-1), sorted=True, return_inverse=True)
        if self.shard_size == 1:
            got = _TableLookup.apply(self.ngram_tables, uniq)
        else:
            owner = row_owner(uniq, self.total_rows, self.shard_size)
            send = torch.bincount(owner, minlength=self.shard_size)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.shard_group)
            send_l, recv_l = send.tolist(), recv.tolist()
            asked = uniq.new_empty(sum(recv_l))
            dist.all_to_all_single(asked, uniq, recv_l, send_l, group=self.shard_group)
            served = _TableLookup.apply(self.ngram_tables, asked - self.row_start)
            got = all_to_all(self.shard_group, served, send_l, recv_l)
        emb = got.index_select(0, inverse).view(s, b, t * self.table_width)
        if tp > 1 and not self.sequence_parallel:
            emb = gather_from_sequence_parallel_region(
                emb, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return emb

    # ------------------------------------------------------------------------------- forward
    def table_rows(self, input_ids: Tensor, ngram_context: Optional[Tensor] = None) -> Tensor:
        """[s, b, T] global rows of the concatenated table for this rank's tokens (the hash;
        reads no parameter, so a caller may compute it once for several modules of one shape)."""
        ids = self.compute_ngram_ids(input_ids, ngram_context)               # [T, b, s]
        return (ids + self.table_offsets.to(ids.device).view(-1, 1, 1)).permute(2, 1, 0)

    def forward(
        self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
        ngram_context: Optional[Tensor] = None, rows: Optional[Tensor] = None,
    ) -> Tensor:
        """input_ids [b, s] -> [s, b, h] ([s/TP, b, h] under SP). ``position_ids`` is unused (RoPE);
        ``ngram_context [b, <=N-1]``: tokens before ``input_ids`` (cached decode); ``rows``: the
        :meth:`table_rows` of ``input_ids`` when already computed. With ``column_output`` the
        result is ``[s, b, width/TP]`` (this TP rank's columns, a ColumnParallelLinear's layout)."""
        if rows is None:
            rows = self.table_rows(input_ids, ngram_context)
        if self.ngram.partition == "tensor":
            sub = self._lookup_tensor(rows)
        else:
            sub = self._lookup_exchange(rows)
        # Each projection through its module (as HF's sum over post_projs): megatron's overlapped
        # parameter all-gather waits for a weight in its module's forward pre-hook.
        pieces = sub.split(self.table_width, dim=-1)                        # T x [s', b, D]
        ngram_part = self.post_projs[0](pieces[0])
        for proj, piece in zip(self.post_projs[1:], pieces[1:]):
            ngram_part = ngram_part + proj(piece)
        word = self.word_embeddings(input_ids)
        if not self.sequence_parallel:
            word = word.transpose(0, 1)
        out = (word + ngram_part) / (1 + self.num_tables)
        if self.ngram.amplification == "sqrt":
            out = out * math.sqrt(self.output_width)
        elif self.output_norm is not None:
            out = self.output_norm(out)
        if self.column_output:
            return to_tp_columns(out.contiguous(), self.tp_group)
        out = out.contiguous()
        if self.config.fp32_residual_connection:
            out = out.float()
        if self.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(out)
        return self.embedding_dropout(out)

    # --------------------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron dist_checkpointing layout: tables as one row-sharded [sum M_i, D] tensor."""
        if sharded_offsets:
            raise NotImplementedError("NgramEmbedding: prepended sharded_offsets are not supported")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}ngram_tables"
        table = self.ngram_tables
        state[key] = ShardedTensor(
            key=key,
            data=table,
            dtype=table.dtype,
            local_shape=tuple(table.shape),
            global_shape=(self.total_rows, self.table_width),
            global_offset=(self.row_start, 0),
            axis_fragmentations=None,
            replica_id=(0, 0, self.replica_group.rank()),
        )
        return state


def init_seed(seed: int, stream: int) -> int:
    """The init seed of stream ``stream`` (0: ``seed`` itself, the model's input embedding; each
    per-layer embedding has its own stream so that no two layers start with equal tables)."""
    return seed if stream == 0 else (seed + 1_000_000_007 * stream) % (2 ** 62)


def to_tp_columns(out: Tensor, tp_group) -> Tensor:
    """[s, b, width] (equal on every TP rank) -> this TP rank's [s, b, width/TP] columns; backward
    gathers the columns, so every rank's parameters before it get the whole gradient."""
    if tp_group.size() == 1:
        return out
    return scatter_to_tensor_model_parallel_region(out, group=tp_group)


class _Shape:
    """Minimal model-shape carrier for check_ngram_rules."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
