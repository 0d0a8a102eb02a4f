"""``--dry-run``: validate a run config for a world size and print the plan without training.

Checks the parallel sizes against the world size, the data paths, and prints the layout, batch
arithmetic, parameter counts and a per-rank memory estimate (weights + grads + Adam state +
activations; a first-order estimate, meant for choosing sizes, not for squeezing the last GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat_megatron.config import RunConfig
from longcat_megatron.runtime import Layout, resolve_layout


@dataclass
class ParamCounts:
    """Parameter counts of the whole model, split by how they are sharded."""

    embedding: int  # input embedding(s) + output layer: sharded over TP (vocab)
    dense: int  # attention, dense MLPs, norms: sharded over TP, split over PP
    expert: int  # routed experts: sharded over EP (and expert-TP), split over PP

    @property
    def total(self) -> int:
        return self.embedding + self.dense + self.expert


def count_parameters(cfg: RunConfig) -> ParamCounts:
    """Analytic parameter counts (LongCat: ``model.summary.total_parameters``, MTP excluded)."""
    m = cfg.model
    h, f, L, V = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.vocab_size
    if m.arch == "longcat":
        from longcat_megatron.model.ngram_config import ngram_parameter_count
        from longcat_megatron.model.summary import total_parameters

        emb = 2 * V * h + (sum(ngram_parameter_count(m.ngram, V, h)) if m.ngram else 0)
        expert = L * (m.num_experts or 0) * 3 * h * (m.moe_ffn_hidden_size or f)
        return ParamCounts(emb, total_parameters(m) - emb - expert, expert)
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
    """Rough per-rank memory (GB) of the largest rank."""
    tp, pp, ep, dp = layout.tensor, layout.pipeline, layout.expert, layout.data
    params = counts.embedding / tp + counts.dense / (tp * pp) + counts.expert / (ep * tp * pp)
    weight_bytes = 2 if cfg.optimizer.bf16 else 4
    grad_bytes = 4
    # fp32 main params (bf16 only) + exp_avg + exp_avg_sq; sharded over DP by the distributed optimizer.
    optim_bytes = (4 if cfg.optimizer.bf16 else 0) + 8
    optim_shard = dp if cfg.parallel.distributed_optimizer else 1
    m, t, d = cfg.model, cfg.train, cfg.data
    layers_per_stage = m.num_layers / pp
    # ~34 bytes/element per layer (Korthikanti et al.) at sequence-parallel TP sharding, x2 for the
    # two attention blocks + MLPs of a LongCat shortcut layer.
    per_layer = 34 * d.seq_length * t.micro_batch_size * m.hidden_size * (2 if m.arch == "longcat" else 1)
    inflight = min(pp, t.global_batch_size // (t.micro_batch_size * dp)) if pp > 1 else 1
    act = per_layer * layers_per_stage * inflight / (tp * layout.context)
    logits = 4 * d.seq_length * t.micro_batch_size * m.vocab_size / (tp * layout.context) * 2
    gb = 1024 ** 3
    return {
        "weights": params * weight_bytes / gb,
        "grads": params * grad_bytes / gb,
        "optimizer": params * optim_bytes / optim_shard / gb,
        "activations": (act + logits) / gb,
    }


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_plan(cfg: RunConfig, world: int) -> Layout:
    """Validate ``cfg`` for ``world`` processes and print the plan."""
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
    print("  memory per rank (GB, estimate): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
          + f"; total {sum(mem.values()):.2f}")
    print(f"  data: {'synthetic' if d.mock else d.paths} (seq {d.seq_length}); "
          f"checkpoints: {cfg.checkpoint.save or '-'}")
    print("  config OK")
    return layout
