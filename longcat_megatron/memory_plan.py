"""Per-rank GPU memory plan of a run (what ``--dry-run`` prints and checks against ``--gpu-memory-gb``).

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
(tests/test_memory_plan.py); not counted: allocator fragmentation, NCCL/CUDA context (~1-2 GB),
TransformerEngine workspaces.
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
        # logits (activation dtype) + fp32 softmax kept by the vocab-parallel cross entropy + the
        # fp32 upcast of the logits while the loss runs
        out["LM head + loss"] = (p + 8) * m.vocab_size / layout.tensor * tokens * heads_out
        out["MTP head"] = mtp_activation(m, seq, mbs, layout, p, backend, recompute, sp)
    if backend == "eager" and recompute != "selective":
        # softmax backward: gradients of the probabilities and of the scores, fp32, one attention
        out["eager softmax backward (transient)"] = \
            2 * 4 * (m.num_attention_heads / layout.tensor) * tokens * seq
    return out


def stage_plan(cfg, counts, layout, *, first: bool, last: bool, num_micro: int) -> MemoryPlan:
    """Memory of one pipeline stage (first / last / both under PP=1)."""
    m = cfg.model
    bf16 = cfg.optimizer.bf16
    w_bytes, g_bytes, o_bytes = (2 if bf16 else 4), 4, (12 if bf16 else 8)
    dist_opt = cfg.parallel.distributed_optimizer
    dense_rep = layout.data * layout.context if dist_opt else 1
    expert_rep = layout.expert_data if dist_opt else 1
    # Dense weights (sharded over TP, replicated over DP x CP) and expert-like weights (sharded over
    # EP x ETP, replicated over expert-DP) of this stage.
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
