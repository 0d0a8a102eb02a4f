"""Build a model chunk from a :class:`ModelConfig` for the training loop.

The loop only sees :func:`build_model_chunk` and the GPTModel-style forward contract:
``chunk(input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)`` returns the
per-token LM loss ``[batch, seq]`` on the last pipeline stage (the hidden states elsewhere). Auxiliary
losses (MoE aux, z-loss, MTP) enter the backward pass inside the model (megatron-core's auto-scalers).
Optional hooks a model may define, called by the loop:
``on_train_step_end(iteration)`` after each optimizer step (e.g. the expert-bias controller) and
``training_metrics() -> dict[str, float]`` for logging (TensorBoard; keys starting with
``progress/`` are also shown on the progress line).
"""

from __future__ import annotations

from typing import Optional

import torch

from longcat_megatron.model.config import ModelConfig


def transformer_config(
    cfg: ModelConfig,
    *,
    tensor: int = 1,
    pipeline: int = 1,
    context: int = 1,
    expert: int = 1,
    expert_tensor: Optional[int] = None,
    sequence_parallel: bool = False,
    virtual_pipeline: Optional[int] = None,
    bf16: bool = False,
    recompute: str = "none",
    recompute_num_layers: Optional[int] = None,
    width_scale: float = 1.0,
):
    """megatron-core TransformerConfig for ``cfg`` with CPU-safe kernel choices (no fusions).

    The fused kernels are GPU-only optimisations; on CUDA with TransformerEngine they can be enabled
    later without changing numerics beyond rounding. ``recompute`` / ``recompute_num_layers`` are
    ``train.recompute`` / ``train.recompute_num_layers`` (see :func:`recompute_fields`).
    ``width_scale`` is the hyperparameter-transfer multiplier s (``longcat_megatron.transfer``): the
    hidden/output init std becomes ``init_method_std / sqrt(s)``, the embeddings' stays.
    """
    from megatron.core.transformer import TransformerConfig

    from longcat_megatron.transfer import init_stds

    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        **init_stds(cfg.init_method_std, width_scale),
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        context_parallel_size=context,
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=expert_tensor,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
        # gloo: batched p2p with PP=2 + VPP gives wrong gradients (same peer both ways).
        batch_p2p_comm=virtual_pipeline is None,
        overlap_p2p_comm=virtual_pipeline is not None,
    )
    if cfg.num_experts:
        kwargs.update(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
            # LongCat's grouped/TE experts (model/experts.py); megatron allows "moe_act" recompute
            # only with this set.
            moe_grouped_gemm=cfg.arch == "longcat" and cfg.expert_impl != "sequential",
        )
    fields = recompute_fields(cfg, recompute, recompute_num_layers,
                              layers_per_chunk=max(1, cfg.num_layers // (pipeline * (virtual_pipeline or 1))))
    if cfg.arch == "gpt" or recompute != "selective":
        kwargs.update(fields)
    tf = TransformerConfig(**kwargs)
    if cfg.arch == "longcat" and recompute == "selective":
        # Set after construction: megatron's checks of these modules concern its own MLA and
        # GroupedMLP (multi_latent_attention / moe_grouped_gemm), not LongCat's modules.
        for name, value in fields.items():
            setattr(tf, name, value)
    return tf


# What ``train.recompute: selective`` recomputes in LongCat (docs/model.md, "Activation recompute"):
# the core attention and the MLA up projections (model/attention.py), the expert activation.
LONGCAT_SELECTIVE_MODULES = ["core_attn", "mla_up_proj", "moe_act"]


def recompute_fields(cfg: ModelConfig, recompute: str, num_layers: Optional[int],
                     layers_per_chunk: int) -> dict:
    """megatron TransformerConfig fields for ``train.recompute``: "none"; "selective" (megatron's
    selective granularity, ``recompute_modules`` = :data:`LONGCAT_SELECTIVE_MODULES` for LongCat,
    ``core_attn`` for GPT); "full" (each layer recomputed from its input, megatron's "block"
    method: the first ``num_layers`` layers of every pipeline chunk, all when None)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        modules = LONGCAT_SELECTIVE_MODULES if cfg.arch == "longcat" else ["core_attn"]
        return dict(recompute_granularity="selective", recompute_modules=list(modules))
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="block",
                    recompute_num_layers=min(num_layers or layers_per_chunk, layers_per_chunk))
    raise ValueError(f"train.recompute={recompute!r}: use none, selective or full")


def build_gpt_chunk(cfg: ModelConfig, tf_config, *, pre_process: bool, post_process: bool,
                    vp_stage: Optional[int] = None):
    """megatron-core GPTModel with the local (non-TransformerEngine) layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, normalization=cfg.normalization)
    return GPTModel(
        config=tf_config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        vp_stage=vp_stage,
    )


def build_model_chunk(cfg: ModelConfig, tf_config, *, pre_process: bool, post_process: bool,
                      vp_stage: Optional[int] = None):
    """One (virtual) pipeline chunk of the configured architecture."""
    if cfg.arch == "gpt":
        return build_gpt_chunk(cfg, tf_config, pre_process=pre_process, post_process=post_process,
                               vp_stage=vp_stage)
    if cfg.arch == "longcat":
        from longcat_megatron.model.longcat import build_longcat_chunk

        return build_longcat_chunk(cfg, tf_config, pre_process=pre_process,
                                   post_process=post_process, vp_stage=vp_stage)
    raise ValueError(f"model.arch={cfg.arch!r}: use 'gpt' or 'longcat'")
