"""Build the parallel model chunks, megatron-core's DDP wrapper, optimizer and LR scheduler."""

from __future__ import annotations

from typing import Optional

import torch

from longcat_megatron import transfer
from longcat_megatron.config import RunConfig
from longcat_megatron.model.factory import build_model_chunk, transformer_config
from longcat_megatron.runtime import Layout, use_cuda


def build_transformer_config(cfg: RunConfig, layout: Layout):
    """The model's TransformerConfig for this run's layout (token-weighted loss across microbatches)."""
    tf = transformer_config(
        cfg.model,
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        context=layout.context,
        expert=layout.expert,
        expert_tensor=layout.expert_tensor,
        sequence_parallel=cfg.parallel.sequence_parallel,
        virtual_pipeline=layout.virtual_pipeline,
        bf16=cfg.optimizer.bf16,
        recompute=cfg.train.recompute,
        recompute_num_layers=cfg.train.recompute_num_layers,
        width_scale=transfer.width_scale(cfg),
    )
    # Loss = sum over tokens / tokens in the global batch: identical for any DP/microbatch split.
    tf.calculate_per_token_loss = True
    # megatron's own deterministic paths (vocab-parallel embedding backward, TE attention); the
    # process-wide settings are training/determinism.py's.
    tf.deterministic_mode = cfg.train.deterministic
    return tf


def build_model(cfg: RunConfig, layout: Layout, wrap_ddp: bool = True) -> list:
    """Model chunks of this rank (one per virtual pipeline stage), DDP-wrapped."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    tf = build_transformer_config(cfg, layout)
    vpp = layout.virtual_pipeline or 1
    chunks = []
    for vp in range(vpp):
        stage = vp if layout.virtual_pipeline else None
        chunk = build_model_chunk(
            cfg.model,
            tf,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        for p in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        chunks.append(chunk)
    if use_cuda():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if tf.bf16:
        from megatron.core.transformer.module import Float16Module

        # bf16 weights and activations; fp32 main params live in the optimizer (as Megatron-LM).
        chunks = [Float16Module(tf, c) for c in chunks]
    if not wrap_ddp:
        return chunks
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # raises on a NaN gradient: off when training/stability.py skips non-finite steps instead
        check_for_nan_in_grad=not cfg.train.skip_non_finite,
        bucket_size=cfg.parallel.ddp_bucket_size,
    )
    wrapped = [
        DistributedDataParallel(config=tf, ddp_config=ddp_cfg, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def sync_params(model_chunks: list) -> None:
    """Finish the distributed optimizer's parameter all-gather now (it is otherwise left to the
    next forward under ``parallel.overlap_param_gather``): before a checkpoint is written or the
    model is handed out, the module parameters must hold the updated values."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(cfg: RunConfig, model_chunks: list):
    """megatron-core Adam (distributed over data parallel when parallel.distributed_optimizer);
    with ``transfer`` on, per-class LR parameter groups (``transfer.optimizer_overrides``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=o.bf16,
        params_dtype=torch.bfloat16 if o.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        # a constant grad scaler of 1.0: megatron's found_inf check skips non-finite updates (bf16 and
        # the distributed optimizer; training/stability.py)
        loss_scale=1.0 if cfg.train.skip_non_finite and (o.bf16 or cfg.parallel.distributed_optimizer) else None,
    )
    return get_megatron_optimizer(opt_cfg, model_chunks,
                                  config_overrides=transfer.optimizer_overrides(cfg, opt_cfg))


def build_scheduler(cfg: RunConfig, optimizer):
    """Warmup + cosine/linear/constant decay, or warmup-stable-decay (megatron-core's scheduler)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, o = cfg.schedule, cfg.optimizer
    decay_iters = s.decay_iters or cfg.train.train_iters
    style = {"wsd": "WSD"}.get(s.style, s.style)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters,
        lr_decay_steps=max(decay_iters, s.warmup_iters + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=s.wsd_decay_iters if s.style == "wsd" else None,
        lr_wsd_decay_style=s.wsd_decay_style if s.style == "wsd" else None,
    )


def parameters_on_rank(model_chunks: list) -> int:
    """Parameters held by this rank (sharded counts)."""
    return sum(p.numel() for c in model_chunks for p in c.parameters())


def unwrap(chunk):
    """The model inside megatron's DDP wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_hook(model_chunks: list, name: str) -> list:
    """Bound methods named ``name`` on the unwrapped chunks that define it."""
    hooks = []
    for c in model_chunks:
        fn: Optional[object] = getattr(unwrap(c), name, None)
        if callable(fn):
            hooks.append(fn)
    return hooks
