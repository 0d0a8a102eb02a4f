"""Analytic parameter count of the LongCat model from its config alone (no torch, no model build).

Kept apart from ``summary.py`` (which builds the model on the meta device) so that
``model/config.py`` can check the N-gram budget rule without importing any model module.
"""

from __future__ import annotations

from longcat_megatron.model.ngram_config import ngram_parameter_count


def mla_parameters(cfg) -> int:
    """One MLA block (q-LoRA down/norm/up, kv down/norm/up, output projection)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    return (h * cfg.q_lora_rank + cfg.q_lora_rank
            + cfg.q_lora_rank * heads * cfg.qk_head_dim
            + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
            + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            + heads * cfg.v_head_dim * h)


def mtp_parameters(cfg) -> int:
    """The MTP head (``mtp_num_layers: 1``): its own embedding, e/h norms, eh projection, one
    attention + dense MLP block with its norms and a final norm; 0 without MTP."""
    if not getattr(cfg, "mtp_num_layers", 0):
        return 0
    h = cfg.hidden_size
    return cfg.vocab_size * h + 2 * h * h + mla_parameters(cfg) + 3 * h * cfg.ffn_hidden_size + 5 * h


def per_layer_embedding_parameters(cfg) -> tuple[int, int, int]:
    """(token tables, hashed n-gram tables, projections) of the per-layer embeddings of all dense
    MLPs (two per shortcut layer; ``model.per_layer_embedding``); zeros for none."""
    kind = getattr(cfg, "per_layer_embedding", "none")
    if kind == "none":
        return 0, 0, 0
    mlps = 2 * cfg.num_layers
    tokens = mlps * cfg.vocab_size * cfg.ffn_hidden_size
    if kind == "ple":
        return tokens, 0, 0
    ngram = cfg.layer_ngram()
    tables, projections = ngram_parameter_count(ngram, cfg.vocab_size, cfg.ffn_hidden_size)
    if ngram.amplification == "layernorm":
        projections += 2 * cfg.ffn_hidden_size
    return tokens, mlps * tables, mlps * projections


def total_parameters(cfg) -> int:
    """Parameters of the ``arch: longcat`` main model (MTP head excluded) from the config alone;
    equals the sum of ``summary.count_parameters`` without the MTP head (tests/test_longcat_config.py)."""
    h = cfg.hidden_size
    mla = mla_parameters(cfg)
    # SwiGLU gate, up and down; a per-layer embedding replaces the up projection
    per_layer = getattr(cfg, "per_layer_embedding", "none") != "none"
    dense = (2 if per_layer else 3) * h * cfg.ffn_hidden_size
    experts = cfg.num_experts or 0
    expert = 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    layer = 2 * (mla + dense + 2 * h) + (experts + cfg.zero_expert_num) * h + experts * expert
    total = 2 * cfg.vocab_size * h + cfg.num_layers * layer + h
    if cfg.ngram is not None:
        total += sum(ngram_parameter_count(cfg.ngram, cfg.vocab_size, h))
        if cfg.ngram.amplification == "layernorm":
            total += 2 * h
    return total + sum(per_layer_embedding_parameters(cfg))
