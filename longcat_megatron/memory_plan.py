"""Per-rank GPU memory plan of a run (what ``--dry-run`` prints and checks against what a
``--gpu-memory-gb`` GPU leaves usable: ``usable_gpu_gib``), and the host RAM of checkpoint saves and
loads per rank and per node (``host_plan``).

Model state per rank (bytes per parameter held by the rank):
  weights 2 (bf16) or 4; gradients 4 (megatron DDP reduces in fp32); Adam 12 with bf16 (fp32 main
  copy + two moments) or 8, divided over the rank's data-parallel replicas by the distributed
  optimizer. Which parameters a rank holds and over how many replicas their optimizer state is
  sharded follows megatron's groups:
    dense (attention, dense MLPs, routers, norms, projections): / TP, split over PP; replicas DP x CP;
    embedding / LM head (+ MTP head): / TP on the first / last pipeline stage; replicas DP x CP;
    FFN experts: / (EP x ETP), split over PP; replicas = expert-DP = world / (PP x EP x ETP);
    N-gram tables: ``partition: tensor`` / TP (replicas DP x CP), ``tensor_data`` / (ETP x EP)
    (replicas expert-DP).

Activations per micro-batch and layer are counted from what the LongCat code saves for backward
(``activation_breakdown``: RMSNorms, MLA, dense MLPs, router, dispatched tokens and experts), per
token and divided by the sharding each tensor has (TP for heads / widths / sequence-parallel
regions, CP for the sequence, the MLA latents replicated over TP). The attention core depends on
``model.attention_backend``: ``eager`` keeps the fp32 softmax ``heads x s x s`` (+ its bool mask)
per attention; ``sdpa`` keeps q, k, the padded v, the output and the log-sum-exp (no ``s x s``
term). ``train.recompute``: ``selective`` drops the attention core and the MLA up-projections and
recomputes the expert activation; ``full`` keeps each recomputed layer's input only (plus one
layer's activations rebuilt during its backward). FFN-expert tokens assume balanced routing at
``budget_target_ffn_experts`` FFN experts per token (else top-k x FFN share of the experts). The
first pipeline stage holds ``min(PP, micro-batches)`` micro-batches in flight (1F1B; with virtual
stages x (1 + (PP-1)/(PP x VPP))). Validated against measured peak memory of CPU runs
(tests/test_memory_plan.py); not counted: TransformerEngine workspaces. The CUDA context, NCCL's
buffers and allocator fragmentation are outside the plan's tensors: ``usable_gpu_gib`` subtracts them
from the GPU's capacity (numbers and sources at its constants).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024 ** 3


def attention_backend(model_cfg) -> str:
    """The configured core-attention backend (``sdpa`` when the config predates the field)."""
    return getattr(model_cfg, "attention_backend", "sdpa")


# ``layout`` below: the job's resolved parallel sizes, :class:`longcat_megatron.runtime.Layout`
# (``expert_tensor_size``: ETP, ``expert_data``: expert-DP).
def residual_shards(layout, sequence_parallel: bool) -> int:
    """Ranks the residual stream's tensors are split over: TP under sequence parallelism, else 1."""
    return layout.tensor if sequence_parallel else 1


def ffn_experts_per_token(m) -> float:
    """Expected FFN experts a token is sent to (the budget target, else top-k x FFN share)."""
    if not m.num_experts:
        return 0.0
    if getattr(m, "budget_target_ffn_experts", None):
        return float(m.budget_target_ffn_experts)
    total = m.num_experts + (m.zero_expert_num if m.arch == "longcat" else 0)
    return m.moe_router_topk * m.num_experts / total


def activation_breakdown(m, seq: int, micro_batch: int, layout, act_bytes: int,
                         backend: str, recompute: str = "none", sequence_parallel: bool = False) -> dict:
    """Bytes saved for backward by ONE LongCat shortcut layer for one micro-batch on one rank, by
    part ("attention core" is the backend-dependent part; "experts" the dispatched tokens)."""
    p, tp, cp = act_bytes, layout.tensor, layout.context
    h, heads = m.hidden_size, m.num_attention_heads / tp
    qk, v, rope = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.qk_rope_head_dim
    qr, kvr = m.q_lora_rank, m.kv_lora_rank
    tokens = seq / cp * micro_batch                     # this rank's query positions
    sp_div = residual_shards(layout, sequence_parallel)  # residual-stream tensors
    fp32_copy = 4 if p != 4 else 0                      # x.float() copies only under bf16
    selective = recompute == "selective"
    # RMSNorm over h + the linear that takes its output: fp32 input, rstd, normed, weighted.
    norm_h = (4 * h + 4 + 2 * p * h) / sp_div
    # MLA latents (full sequence, replicated over TP): their norms and the up-projection inputs.
    q_latent = 4 * qr + 4 + 2 * p * qr
    kv_latent = (4 * (kvr + rope) if p == 4 else 4 * kvr) + 4 + 2 * p * kvr
    proj_in = p * heads * v
    # Up-projections (recomputed by "selective"): rotated-q source, query; key and value over the
    # CP-gathered keys; sdpa pads v to the q.k head dim.
    v_kept = heads * ((m.qk_nope_head_dim + v) if backend == "eager" else max(qk, v))
    up_proj = 2 * p * heads * qk + (p * heads * qk + p * v_kept) * cp
    if backend == "eager":  # fp32 softmax probabilities (+ their bf16 copy) and the bool mask
        core = (4 + fp32_copy // 2) * heads * seq + seq
    else:                   # output (padded) + fp32 log-sum-exp
        core = p * heads * max(qk, v) + 4 * heads
    mlp = 4 * p * m.ffn_hidden_size / tp                # fc1 output (2f), silu output, fc2 input
    routable = (m.num_experts or 0) + m.zero_expert_num
    router = (4 * routable + 8 * m.moe_router_topk + fp32_copy * h + p) / sp_div
    # Per FFN pick (expert width / ETP; ETP ranks see their group's tokens): permuted input,
    # fc2 output x prob, fc1 output + activation + fc2 input (activation recomputed by selective),
    # indices and probs.
    fe = (m.moe_ffn_hidden_size or m.ffn_hidden_size) / layout.expert_tensor_size
    picks = ffn_experts_per_token(m) * layout.expert_tensor_size / sp_div
    experts = picks * (2 * p * h + (2 if selective else 4) * p * fe + 12)
    return {
        "norms": 4 * norm_h * tokens,
        "MLA projections": 2 * (q_latent + kv_latent + proj_in + (0 if selective else up_proj)) * tokens,
        "attention core": 0.0 if selective else 2 * core * tokens,
        "dense MLPs": 2 * mlp * tokens,
        "router": router * tokens,
        "MoE dispatch + experts": experts * tokens,
    }


def mtp_activation(m, seq: int, micro_batch: int, layout, act_bytes: int, backend: str,
                   recompute: str, sequence_parallel: bool = False) -> float:
    """The MTP head: about one attention block + one dense MLP of a shortcut layer, + its eh_proj."""
    if not getattr(m, "mtp_num_layers", 0):
        return 0.0
    per = activation_breakdown(m, seq, micro_batch, layout, act_bytes, backend, recompute,
                               sequence_parallel)
    tokens = seq / layout.context * micro_batch
    return (per["MLA projections"] + per["attention core"] + per["dense MLPs"] + per["norms"]) / 2 \
        + 4 * act_bytes * m.hidden_size * tokens


@dataclass
class MemoryPlan:
    """Per-rank memory of the largest pipeline stage, in bytes, by part."""

    parts: dict = field(default_factory=dict)
    activation_parts: dict = field(default_factory=dict)
    stage: str = "only"

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return (", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
                + f"; total {self.total / GIB:.2f} GiB")


def inflight_microbatches(layout, num_micro: int, first_stage: bool = True) -> float:
    """Micro-batches whose activations a stage holds at once: the first stage min(PP, m) under 1F1B
    (x (1 + (PP-1)/(PP x VPP)) interleaved), the last stage 1."""
    if layout.pipeline == 1 or not first_stage:
        return 1.0
    base = min(layout.pipeline, num_micro)
    if layout.virtual_pipeline:
        return base * (1 + (layout.pipeline - 1) / (layout.pipeline * layout.virtual_pipeline))
    return float(base)


def activation_bytes(cfg, layout, *, backend=None, recompute=None, num_micro: int = 1,
                     first_stage: bool = True, last_stage: bool = True) -> dict:
    """Activation memory (bytes, by part) of a pipeline stage: its layers' saved tensors for the
    micro-batches in flight, the input embedding (first stage), LM head + loss and MTP head (last
    stage), and the largest transient of a backward step (eager softmax gradients, a fully
    recomputed layer)."""
    m, t = cfg.model, cfg.train
    backend = backend or attention_backend(m)
    recompute = recompute or getattr(t, "recompute", "none")
    p = 2 if cfg.optimizer.bf16 else 4
    seq, mbs = cfg.data.seq_length, t.micro_batch_size
    layers = m.num_layers / layout.pipeline
    sp = bool(cfg.parallel.sequence_parallel)
    per_layer = activation_breakdown(m, seq, mbs, layout, p, backend, recompute, sp)
    layer_total = sum(per_layer.values())
    tokens = seq / layout.context * mbs
    sp_div = residual_shards(layout, sp)
    inflight = inflight_microbatches(layout, num_micro, first_stage)
    out: dict = {}
    if recompute == "full":
        n_rec = min(getattr(t, "recompute_num_layers", None) or layers, layers)
        kept = (layers - n_rec) * layer_total + n_rec * p * m.hidden_size * tokens / sp_div
        out["layers (full recompute: inputs)"] = kept * inflight
        out["recompute transient (one layer)"] = layer_total
    else:
        for name, value in per_layer.items():
            out[name] = value * layers * inflight
    h = m.hidden_size
    if first_stage:
        emb = 2 * p * h * tokens / sp_div
        if getattr(m, "ngram", None) is not None:  # looked-up rows, projections' inputs, ids
            emb += 3 * p * h * tokens / sp_div + 8 * m.ngram.num_tables * tokens
        out["input embedding"] = emb * inflight
    if last_stage:
        heads_out = 1 + (1 if getattr(m, "mtp_num_layers", 0) else 0)
        # megatron's vocab-parallel cross entropy keeps only the fp32 softmax of each head; one
        # head's logits (forward) or their gradient (backward) exist at a time (measured by
        # bench/one_rank_rehearsal.py: 4 B per logit per head + one head in the activation dtype)
        logits = m.vocab_size / layout.tensor * tokens
        out["LM head + loss"] = 4 * logits * heads_out + p * logits
        out["MTP head"] = mtp_activation(m, seq, mbs, layout, p, backend, recompute, sp)
    if m.num_experts and getattr(m, "expert_impl", "grouped") == "grouped":
        # one layer's backward: the stacked expert weight gradients [E, 2F, H] + [E, H, F] (alive
        # until DDP adds them into main_grad) and the dispatched tokens' gradients
        fe = (m.moe_ffn_hidden_size or m.ffn_hidden_size) / layout.expert_tensor_size
        local = m.num_experts / layout.expert
        rows = ffn_experts_per_token(m) * layout.expert_tensor_size / sp_div * tokens
        transient = 3 * local * fe * h * p + rows * (2 * h + 4 * fe) * p
        if last_stage:  # by then the LM head's and the MTP head's memory is free again
            transient -= out["LM head + loss"] + out["MTP head"]
        if transient > 0:
            out["expert backward (transient, one layer)"] = transient
    if backend == "eager" and recompute != "selective":
        # softmax backward: gradients of the probabilities and of the scores, fp32, one attention
        out["eager softmax backward (transient)"] = \
            2 * 4 * (m.num_attention_heads / layout.tensor) * tokens * seq
    return out


def stage_parameters(cfg, counts, layout, *, first: bool, last: bool) -> tuple[float, float]:
    """Parameters a rank of one pipeline stage holds: (dense, expert-like). Dense ones are sharded
    over TP and replicated over DP x CP; expert-like ones (FFN experts, ``tensor_data`` N-gram
    tables) sharded over EP x ETP and replicated over expert-DP."""
    m = cfg.model
    dense = counts.dense / layout.pipeline / layout.tensor
    expert = counts.expert / layout.pipeline / (layout.expert * layout.expert_tensor_size)
    word = m.vocab_size * m.hidden_size / layout.tensor
    if first:
        dense += word + counts.ngram_projections / layout.tensor
        if counts.ngram_tables and m.ngram.partition == "tensor_data":
            expert += counts.ngram_tables / (layout.expert * layout.expert_tensor_size)
        else:
            dense += counts.ngram_tables / layout.tensor
    if last:
        dense += word + counts.mtp / layout.tensor
    return dense, expert


def stage_plan(cfg, counts, layout, *, first: bool, last: bool, num_micro: int) -> MemoryPlan:
    """Memory of one pipeline stage (first / last / both under PP=1)."""
    bf16 = cfg.optimizer.bf16
    w_bytes, g_bytes, o_bytes = (2 if bf16 else 4), 4, (12 if bf16 else 8)
    dist_opt = cfg.parallel.distributed_optimizer
    dense_rep = layout.data * layout.context if dist_opt else 1
    expert_rep = layout.expert_data if dist_opt else 1
    dense, expert = stage_parameters(cfg, counts, layout, first=first, last=last)
    plan = MemoryPlan(stage="only" if first and last else ("first" if first else "last"))
    plan.parts["weights"] = (dense + expert) * w_bytes
    plan.parts["gradients"] = (dense + expert) * g_bytes
    plan.parts["optimizer"] = (dense / dense_rep + expert / expert_rep) * o_bytes
    plan.activation_parts = activation_bytes(cfg, layout, num_micro=num_micro, first_stage=first,
                                             last_stage=last)
    plan.parts["activations"] = sum(plan.activation_parts.values())
    return plan


def memory_plan(cfg, layout, counts, *, num_micro: int = 1) -> MemoryPlan:
    """The per-rank plan of the pipeline stage that needs the most memory (first or last)."""
    if layout.pipeline == 1:
        return stage_plan(cfg, counts, layout, first=True, last=True, num_micro=num_micro)
    stages = [stage_plan(cfg, counts, layout, first=True, last=False, num_micro=num_micro),
              stage_plan(cfg, counts, layout, first=False, last=True, num_micro=num_micro)]
    return max(stages, key=lambda plan: plan.total)


# --------------------------------------------------------------- the GPU memory a plan must fit
# ``--gpu-memory-gb`` is the GPU's nominal memory (80 for an H100 80GB). What a plan may use of it:
#   reported capacity: an H100 "80GB" reports 81,559 MiB (85.52e9 B, 79.65 GiB: nvidia-smi "Total",
#     torch.cuda.get_device_properties().total_memory) of its 80 GiB of HBM (ECC and the driver keep
#     the rest); an H200 "141GB" reports 143,771 MiB, the same 99.56 %. REPORTED_FRACTION applies it.
#   minus memory outside PyTorch's caching allocator, which the plan (tensors) does not see:
#     the CUDA context with the cuBLAS / cuDNN handles and workspaces, CUDA_CONTEXT_GIB; and
#     NCCL's buffers, NCCL_GIB_PER_COMMUNICATOR per communicator (NVIDIA/nccl#964 measured 544 MB
#     for a 2-rank and 688 MB for a 4-rank group through PyTorch on A100; NVLink SHARP on
#     NVSwitch systems adds more: NeMo's launcher sets NCCL_NVLS_ENABLE=0 to save it), one per
#     process group of more than one rank the layout communicates over (nccl_communicators);
#   minus FRAGMENTATION_MARGIN of what is left: the caching allocator reserves more than the live
#     tensors (blocks split and cached between steps); our margin, not a measurement
#     (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps fragmentation lower).
REPORTED_FRACTION = 81559 / 81920
CUDA_CONTEXT_GIB = 1.0
NCCL_GIB_PER_COMMUNICATOR = 0.5
FRAGMENTATION_MARGIN = 0.10


def nccl_communicators(layout) -> int:
    """NCCL communicators a rank uses: one per process group of more than one rank among TP, CP,
    the dense gradients' DP x CP, EP (token all-to-all), expert-DP (expert gradients), expert-TP
    (when it differs from TP), the world (gradient norm, loss and stop reductions), and two for
    PP (to the previous and the next stage)."""
    groups = [layout.tensor, layout.context, layout.data * layout.context, layout.expert,
              layout.expert_data if layout.expert > 1 or layout.expert_tensor is not None else 1,
              layout.expert_tensor_size if layout.expert_tensor_size != layout.tensor else 1,
              layout.world]
    return sum(1 for g in groups if g > 1) + (2 if layout.pipeline > 1 else 0)


def usable_gpu_gib(gpu_memory_gb: float, layout) -> tuple[float, dict]:
    """(GiB a plan may use on a GPU of ``gpu_memory_gb`` nominal GB, the deductions by name)."""
    reported = gpu_memory_gb * REPORTED_FRACTION
    reserve = CUDA_CONTEXT_GIB + NCCL_GIB_PER_COMMUNICATOR * nccl_communicators(layout)
    margin = FRAGMENTATION_MARGIN * (reported - reserve)
    return reported - reserve - margin, {"reported": reported, "CUDA context + NCCL": reserve,
                                         "fragmentation margin": margin}


# ----------------------------------------------------------- host RAM of checkpoint saves and loads
# What a rank holds in host memory while a checkpoint is saved or loaded (the GPU state is not moved
# out; torch.load of a stored tensor and the writer's buffers are transients of one tensor):
#   model weights it writes: their D2H copy (bf16), its share of the replicated ones under
#     checkpoint.fully_parallel_save (else the data-parallel rank 0 writes them all);
#   optimizer state, fully_reshardable (fp32 main copy + 2 moments = 12 B per parameter of the
#     rank's model-parallel shard, "S"), by checkpoint.optimizer_gather:
#       per_param  save: the parameters it owns, S_dense / (DP x CP) + S_expert / expert-DP, plus at
#                  most one whole parameter more (the largest, the owner's); load: one phase
#                  (optimizer_checkpoint.LOAD_PHASE_BYTES, or the largest parameter when it is bigger);
#       all_ranks  save: all of S (megatron's all-gather) plus a copy of what it writes (its share);
#                  load: all of S;
#       dp_rank_0  save: on data-parallel rank 0 of each group all of S twice (the gathered state
#                  and the writer's copy of its views), nothing on the others; load: as all_ranks.
#   dp_reshardable: its own optimizer shard (S_dense / (DP x CP) + S_expert / expert-DP).
# Under async saving the writer's copies stay until the background write ends. The worst node is
# the one with data-parallel rank 0 of its groups: megatron numbers ranks TP first, so the first
# node of every pipeline stage holds DP-rank 0 of every dense group (TP ranks) and, with EP x ETP
# >= ranks per node, of every expert group; for per_param and all_ranks all nodes are alike.
OPTIMIZER_STATE_BYTES = 12  # per parameter: fp32 main copy, exp_avg, exp_avg_sq (any precision)


def largest_parameter(cfg, layout, *, first: bool, last: bool) -> float:
    """Elements of the largest single parameter on a rank: the word embedding / output layer, the
    N-gram table shard (first stage), or a layer's stacked FFN-expert fc1 (grouped experts hold all
    local experts of a layer as one [E, 2F, H] parameter)."""
    m = cfg.model
    word = m.vocab_size * m.hidden_size / layout.tensor
    out = [word if first or last else 0.0]
    if m.num_experts:
        local = m.num_experts / layout.expert
        out.append(local * 2 * (m.moe_ffn_hidden_size or m.ffn_hidden_size) * m.hidden_size
                   / layout.expert_tensor_size)
    if first and getattr(m, "ngram", None) is not None:
        from longcat_megatron.model.ngram_config import ngram_parameter_count

        tables, _ = ngram_parameter_count(m.ngram, m.vocab_size, m.hidden_size)
        shards = (layout.expert * layout.expert_tensor_size if m.ngram.partition == "tensor_data"
                  else layout.tensor)
        out.append(tables / shards)
    dense_fc1 = 2 * m.ffn_hidden_size * m.hidden_size / layout.tensor
    return max(out + [dense_fc1])


@dataclass
class HostPlan:
    """Host RAM (bytes) of checkpoint saves and loads: per rank (the rank that needs the most) and
    for the worst node, with how many of its ranks hold gathered state."""

    gather: str
    ranks_per_node: int
    save_rank: float
    load_rank: float
    save_node: float
    load_node: float
    node_note: str = ""
    stage: str = "only"


def _dp0_ranks_on_first_node(layout, ranks_per_node: int) -> tuple[int, int]:
    """(dense DP-rank-0 ranks, expert-DP-rank-0 ranks) on the first node of a pipeline stage:
    megatron orders dense groups tp-cp-ep-dp-pp and expert groups tp(=ETP)-ep-dp-pp, so within a
    stage the ranks below TP (dense) and below ETP x EP (expert) are data-parallel rank 0."""
    per_node = min(ranks_per_node, layout.world // layout.pipeline)
    return min(per_node, layout.tensor), min(per_node, layout.expert * layout.expert_tensor_size)


def host_stage_plan(cfg, counts, layout, *, first: bool, last: bool, ranks_per_node: int = 8,
                    gather: str = "per_param", phase_bytes: float = 2 * GIB) -> HostPlan:
    """Host RAM of checkpoint saves and loads for one pipeline stage (see the notes above)."""
    c = cfg.checkpoint
    w = 2 if cfg.optimizer.bf16 else 4
    dense, expert = stage_parameters(cfg, counts, layout, first=first, last=last)
    dense_rep = layout.data * layout.context if cfg.parallel.distributed_optimizer else 1
    expert_rep = layout.expert_data if cfg.parallel.distributed_optimizer else 1
    s_dense, s_expert = OPTIMIZER_STATE_BYTES * dense, OPTIMIZER_STATE_BYTES * expert
    share = s_dense / dense_rep + s_expert / expert_rep
    largest = OPTIMIZER_STATE_BYTES * largest_parameter(cfg, layout, first=first, last=last)
    largest = min(largest, s_dense + s_expert)
    per_node = min(ranks_per_node, layout.world)
    n_dense0, n_expert0 = _dp0_ranks_on_first_node(layout, ranks_per_node)
    # model weights written (D2H copies): a share of each replicated tensor, or all on DP-rank 0
    if c.fully_parallel_save:
        weights_rank = w * (dense / dense_rep + expert / expert_rep)
        weights_node = per_node * weights_rank
    else:
        weights_rank = w * (dense + expert)
        weights_node = w * (n_dense0 * dense + n_expert0 * expert)
    transient = largest / 3  # one stored tensor read whole by torch.load
    note = ""
    if not c.fully_reshardable:
        save_rank = share
        save_node = per_node * save_rank
        load_rank, load_node = share + transient, per_node * (share + transient)
    elif gather == "per_param":
        save_rank = share + largest
        save_node = per_node * save_rank
        load_rank = max(phase_bytes, largest) + transient
        load_node = per_node * load_rank
    elif gather == "all_ranks":
        copies = share if c.fully_parallel_save else s_dense + s_expert
        save_rank = s_dense + s_expert + copies
        save_node = per_node * (s_dense + s_expert) + (
            per_node * share if c.fully_parallel_save else n_dense0 * s_dense + n_expert0 * s_expert)
        load_rank, load_node = s_dense + s_expert + transient, per_node * (s_dense + s_expert + transient)
    else:  # dp_rank_0
        save_rank = 2 * (s_dense + s_expert)
        save_node = 2 * (n_dense0 * s_dense + n_expert0 * s_expert)
        note = (f"{n_dense0} of the node's {per_node} ranks are DP-rank 0 of a dense group, "
                f"{n_expert0} of an expert group")
        load_rank, load_node = s_dense + s_expert + transient, per_node * (s_dense + s_expert + transient)
    stage = "only" if first and last else ("first" if first else "last")
    return HostPlan(gather, per_node, save_rank + weights_rank, load_rank,
                    save_node + weights_node, load_node, note, stage)


def host_plan(cfg, layout, counts, *, ranks_per_node: int = 8, gather=None,
              phase_bytes: float = 2 * GIB) -> HostPlan:
    """The host plan of the pipeline stage whose worst node needs the most."""
    gather = gather or getattr(cfg.checkpoint, "optimizer_gather", "per_param")
    stages = ([(True, True)] if layout.pipeline == 1 else [(True, False), (False, True)])
    plans = [host_stage_plan(cfg, counts, layout, first=f, last=l, ranks_per_node=ranks_per_node,
                             gather=gather, phase_bytes=phase_bytes) for f, l in stages]
    return max(plans, key=lambda hp: max(hp.save_node, hp.load_node))
