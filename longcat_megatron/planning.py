"""``--dry-run``: validate a run config for a world size and print the plan without training.

Checks the parallel sizes against the world size, the data paths, and prints the layout, batch
arithmetic, parameter counts and the per-rank memory plan (``memory_plan.py``: weights, gradients,
Adam state per sharding group, activations by part for the attention backend and recompute
setting). A plan over what a ``--gpu-memory-gb`` GPU leaves usable (its reported capacity minus
CUDA context, NCCL buffers and a fragmentation margin: ``memory_plan.usable_gpu_gib``) is refused
(exit 2, with the breakdown) unless ``--force``. The host RAM that checkpoint saves and loads need
per rank and on the worst node (``memory_plan.host_plan``) is printed, and checked against
``checkpoint.host_memory_gb`` when that is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat_megatron.config import RunConfig
from longcat_megatron.errors import UserInputError
from longcat_megatron.runtime import Layout, resolve_layout
from longcat_megatron.transfer import describe as describe_transfer


@dataclass
class ParamCounts:
    """Parameter counts of the whole model, split by how they are sharded."""

    embedding: int  # input embedding(s) + output layer: sharded over TP (vocab)
    dense: int  # attention, dense MLPs, norms: sharded over TP, split over PP
    expert: int  # routed experts: sharded over EP (and expert-TP), split over PP
    ngram_tables: int = 0  # N-gram sub-tables (inside ``embedding``): over TP or ETP x EP
    ngram_projections: int = 0  # N-gram projections (inside ``embedding``)
    mtp: int = 0  # MTP head (not in ``total``), last pipeline stage

    @property
    def total(self) -> int:
        return self.embedding + self.dense + self.expert


def count_parameters(cfg: RunConfig) -> ParamCounts:
    """Analytic parameter counts (LongCat: ``model.summary.total_parameters``, MTP excluded)."""
    m = cfg.model
    h, f, L, V = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.vocab_size
    if m.arch == "longcat":
        from longcat_megatron.model.ngram_config import ngram_parameter_count
        from longcat_megatron.model.param_count import mtp_parameters, total_parameters

        tables, projections = ngram_parameter_count(m.ngram, V, h) if m.ngram else (0, 0)
        emb = 2 * V * h + tables + projections
        expert = L * (m.num_experts or 0) * 3 * h * (m.moe_ffn_hidden_size or f)
        return ParamCounts(emb, total_parameters(m) - emb - expert, expert, tables, projections,
                           mtp_parameters(m))
    emb = V * h * (2 if m.untie_embeddings_and_output_weights else 1)
    attn = 4 * h * h + 2 * h
    if m.num_experts:
        ef = m.moe_ffn_hidden_size or f
        expert = L * m.num_experts * 3 * h * ef
        dense = L * (attn + h * m.num_experts) + h
    else:
        expert = 0
        dense = L * (attn + 3 * h * f) + h
    return ParamCounts(emb, dense, expert)


def memory_per_rank_gb(cfg: RunConfig, layout: Layout, counts: ParamCounts) -> dict:
    """Per-rank memory (GiB) of the largest pipeline stage: weights, gradients, optimizer,
    activations (``memory_plan`` for LongCat; Korthikanti et al.'s estimate for the GPT baseline)."""
    from longcat_megatron.memory_plan import GIB, memory_plan

    t = cfg.train
    num_micro = t.global_batch_size // (t.micro_batch_size * layout.data)
    if cfg.model.arch == "longcat":
        return {k: v / GIB for k, v in memory_plan(cfg, layout, counts, num_micro=num_micro).parts.items()}
    tp, pp, ep, dp = layout.tensor, layout.pipeline, layout.expert, layout.data
    params = counts.embedding / tp + counts.dense / (tp * pp) + counts.expert / (ep * tp * pp)
    weight_bytes = 2 if cfg.optimizer.bf16 else 4
    optim_bytes = (4 if cfg.optimizer.bf16 else 0) + 8
    optim_shard = dp if cfg.parallel.distributed_optimizer else 1
    m, d = cfg.model, cfg.data
    # 34 sbh (SP-sharded) + 5 a s^2 b (the unfused local-spec attention keeps its scores), per layer.
    s, b, h = d.seq_length / layout.context, t.micro_batch_size, m.hidden_size
    per_layer = (34 * s * b * h + 5 * m.num_attention_heads * s * d.seq_length * b) / tp
    inflight = min(pp, num_micro) if pp > 1 else 1
    act = per_layer * m.num_layers / pp * inflight
    logits = 4 * s * b * m.vocab_size / tp * 2
    return {
        "weights": params * weight_bytes / GIB,
        "gradients": params * 4 / GIB,
        "optimizer": params * optim_bytes / optim_shard / GIB,
        "activations": (act + logits) / GIB,
    }


class MemoryBudgetError(UserInputError):
    """The memory plan does not fit ``--gpu-memory-gb``."""


def usable_line(gpu_memory_gb: float, layout: Layout) -> str:
    from longcat_megatron.memory_plan import usable_gpu_gib

    usable, parts = usable_gpu_gib(gpu_memory_gb, layout)
    return (f"{usable:.1f} GiB usable per {gpu_memory_gb:g} GB GPU ({parts['reported']:.2f} GiB "
            f"reported - {parts['CUDA context + NCCL']:.1f} CUDA context + NCCL - "
            f"{parts['fragmentation margin']:.1f} fragmentation margin)")


def check_budget(cfg: RunConfig, layout: Layout, mem: dict, gpu_memory_gb: float, force: bool) -> str:
    """'' when the plan fits what a ``gpu_memory_gb`` GPU leaves usable (``memory_plan.usable_gpu_gib``:
    reported capacity minus CUDA context, NCCL buffers and a fragmentation margin); otherwise raise
    MemoryBudgetError with the breakdown, or (``force``) return a warning line."""
    from longcat_megatron.memory_plan import usable_gpu_gib

    total = sum(mem.values())
    usable, _ = usable_gpu_gib(gpu_memory_gb, layout)
    if total <= usable:
        return ""
    top = sorted(mem.items(), key=lambda kv: -kv[1])
    message = (
        f"the memory plan needs {total:.1f} GiB per rank but --gpu-memory-gb is {gpu_memory_gb:g}, "
        f"{usable_line(gpu_memory_gb, layout)} ({layout.describe()}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in top)
        + ". Shrink it with more tensor/pipeline/expert parallelism, a smaller train.micro_batch_size, "
        "train.recompute=selective|full, model.attention_backend=sdpa, or "
        "model.ngram.partition=tensor_data; --force plans anyway"
    )
    if not force:
        raise MemoryBudgetError(message)
    return "  WARNING (--force): " + message


class HostMemoryError(UserInputError):
    """The checkpoint host-RAM plan's worst node needs more than ``checkpoint.host_memory_gb``."""


def ranks_per_node(world: int) -> int:
    """Ranks per node of the planned job: the launcher's NPROC_PER_NODE (or LOCAL_WORLD_SIZE), else 8
    (the clusters' GPUs per node), at most the world."""
    import os

    value = os.environ.get("NPROC_PER_NODE") or os.environ.get("LOCAL_WORLD_SIZE") or "8"
    return max(1, min(world, int(value) if value.isdigit() else 8))


def host_lines(cfg: RunConfig, layout: Layout, counts: ParamCounts, world: int, force: bool) -> list:
    """The checkpoint host-RAM plan (``memory_plan.host_plan``) as printed lines; raises
    HostMemoryError when ``checkpoint.host_memory_gb`` is set and the worst node needs more (a
    warning line with ``force``)."""
    from longcat_megatron.memory_plan import GIB, host_plan
    from longcat_megatron.training.optimizer_checkpoint import LOAD_PHASE_BYTES, OPTIMIZER_GATHERS

    c = cfg.checkpoint
    if c.optimizer_gather not in OPTIMIZER_GATHERS:
        from longcat_megatron.config import ConfigError

        raise ConfigError(f"checkpoint.optimizer_gather={c.optimizer_gather!r}: use one of "
                          f"{list(OPTIMIZER_GATHERS)}")
    per_node = ranks_per_node(world)
    plans = {g: host_plan(cfg, layout, counts, ranks_per_node=per_node, gather=g,
                          phase_bytes=LOAD_PHASE_BYTES) for g in OPTIMIZER_GATHERS}
    hp = plans[c.optimizer_gather]
    fmt = "optimizer_gather=" + (c.optimizer_gather if c.fully_reshardable else "- (dp_reshardable)")
    stage = {"only": "", "first": ", first pipeline stage", "last": ", last pipeline stage"}[hp.stage]
    lines = [f"  host RAM for checkpoints (GiB, estimate; {fmt}, {per_node} ranks per node{stage}): "
             f"save {hp.save_rank / GIB:.1f} per rank, {hp.save_node / GIB:.0f} on the worst node"
             f"{' (held until the background write ends)' if c.async_save else ''}; "
             f"load {hp.load_rank / GIB:.1f} per rank, {hp.load_node / GIB:.0f} per node"
             + (f"; {hp.node_note}" if hp.node_note else "")]
    if c.fully_reshardable:
        lines.append("    worst node by optimizer_gather (save / load): " + ", ".join(
            f"{g} {p.save_node / GIB:.0f} / {p.load_node / GIB:.0f}" for g, p in plans.items()))
    need = max(hp.save_node, hp.load_node) / GIB
    if c.host_memory_gb is not None and need > c.host_memory_gb:
        message = (f"checkpoint saves and loads need {need:.0f} GiB of host RAM on the worst node but "
                   f"checkpoint.host_memory_gb is {c.host_memory_gb:g} ({fmt}): use "
                   "checkpoint.optimizer_gather=per_param, checkpoint.fully_parallel_save=true, or "
                   "fewer ranks per node; --force plans anyway")
        if not force:
            raise HostMemoryError(message)
        lines.append("  WARNING (--force): " + message)
    return lines


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_plan(cfg: RunConfig, world: int, gpu_memory_gb: float = 80.0, force: bool = False) -> Layout:
    """Validate ``cfg`` for ``world`` processes and print the plan; a plan over ``gpu_memory_gb``
    per rank raises :class:`MemoryBudgetError` unless ``force`` (not checked for gloo/CPU runs)."""
    p, t, d = cfg.parallel, cfg.train, cfg.data
    layout = resolve_layout(world, p.tensor, p.pipeline, p.context, p.expert, p.virtual_pipeline,
                            cfg.model.num_experts, p.expert_tensor)
    if t.global_batch_size % (t.micro_batch_size * layout.data):
        from longcat_megatron.config import ConfigError

        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({layout.data}) for {world} processes"
        )
    counts = count_parameters(cfg)
    mem = memory_per_rank_gb(cfg, layout, counts)
    tokens = t.global_batch_size * d.seq_length
    print(f"plan for {world} processes: {layout.describe()}")
    print(f"  model.arch={cfg.model.arch}: {_count(counts.total)} parameters "
          f"(embedding/output {_count(counts.embedding)}, dense {_count(counts.dense)}, "
          f"experts {_count(counts.expert)})")
    print(f"  tokens/step {tokens:,}; {t.train_iters:,} iterations = {tokens * t.train_iters / 1e9:.3f}B tokens; "
          f"{t.global_batch_size // (t.micro_batch_size * layout.data)} micro-batches per DP rank")
    print("  memory per rank (GiB, estimate): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
          + f"; total {sum(mem.values()):.2f}")
    if cfg.model.arch == "longcat":
        print("    " + _activation_line(cfg, layout, counts))
    warning = "" if p.backend == "gloo" else check_budget(cfg, layout, mem, gpu_memory_gb, force)
    if warning:
        print(warning)
    elif p.backend != "gloo":
        print(f"    GPU: {usable_line(gpu_memory_gb, layout)}")
    for line in host_lines(cfg, layout, counts, world, force):
        print(line)
    print("\n".join(describe_transfer(cfg)))  # hyperparameter transfer by width scaling
    print(f"  data: {'synthetic' if d.mock else d.paths} (seq {d.seq_length}); "
          f"checkpoints: {cfg.checkpoint.save or '-'}")
    print("  config OK" + (f" (plan fits {gpu_memory_gb:g} GB GPUs)" if p.backend != "gloo" and not warning else ""))
    return layout


def _activation_line(cfg: RunConfig, layout: Layout, counts: ParamCounts) -> str:
    from longcat_megatron.memory_plan import GIB, attention_backend, memory_plan

    t = cfg.train
    plan = memory_plan(cfg, layout, counts,
                       num_micro=t.global_batch_size // (t.micro_batch_size * layout.data))
    stage = {"only": "", "first": ", first pipeline stage", "last": ", last pipeline stage"}[plan.stage]
    return (f"activations (attention {attention_backend(cfg.model)}, recompute "
            f"{getattr(t, 'recompute', 'none')}, ETP{layout.expert_tensor_size}, expert-DP{layout.expert_data}{stage}): "
            + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.activation_parts.items() if v))
