"""Tiny LongCat model configs and helpers shared by the tests/test_longcat_*.py files."""

from __future__ import annotations

import dataclasses

from longcat_megatron.model.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer LongCat with 4 FFN + 2 zero experts (top-3), MLA, MTP off unless asked."""
    cfg = ModelConfig(
        arch="longcat", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
        vocab_size=96, max_position_embeddings=256, num_experts=4, zero_expert_num=2,
        moe_router_topk=3, moe_ffn_hidden_size=16, routed_scaling_factor=2.0, q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, init_method_std=0.1,
        rotary_base=10000.0,
    )
    return dataclasses.replace(cfg, **overrides)


YARN = dict(rope_type="yarn", yarn_factor=4.0, yarn_original_max_position_embeddings=16,
            yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)


def pack(obj) -> bytes:
    """Tensors (nested in dicts/tuples) as bytes: safe through the harness's process queues."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)
