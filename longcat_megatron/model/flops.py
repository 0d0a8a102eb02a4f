"""Training FLOPs per token of a model config (for the progress line's TFLOP/s and MFU).

Counts the matrix multiplies a token goes through, forward x 3 (backward = 2 x forward; activation
recomputation is not counted, as in the usual MFU definition):

* every linear layer a token touches: 2 FLOPs per weight. For ``arch: longcat`` that is, per
  shortcut layer, two MLA blocks, two dense MLPs, the router and ``experts_per_token`` FFN experts
  (zero experts cost nothing); the N-gram projections; the LM head; and the MTP head (one dense
  layer + its projection + LM head) when configured. Embedding and N-gram table lookups are not
  matmuls and count 0;
* attention scores and values: ``2 * heads * (qk_head_dim + v_head_dim) * s/2`` per token and
  attention block (causal: a token attends to s/2 positions on average).

``experts_per_token`` defaults to the budget target K_e (``model.budget_target_ffn_experts``), else
the top-k; the training loop passes the measured value of the step when the model reports it.
"""

from __future__ import annotations

from typing import Optional

from longcat_megatron.model.param_count import mla_parameters


def _mla_linear(cfg) -> int:
    """Weights a token multiplies in one MLA block: its parameters less the two latent norms."""
    return mla_parameters(cfg) - cfg.q_lora_rank - cfg.kv_lora_rank


def _attention_core(cfg, seq_length: int, qk_dim: int, v_dim: int, causal: bool) -> float:
    """Forward FLOPs per token of scores + weighted values in one attention block."""
    return 2.0 * cfg.num_attention_heads * (qk_dim + v_dim) * seq_length / (2 if causal else 1)


def forward_flops_per_token(cfg, seq_length: int, experts_per_token: Optional[float] = None,
                            causal: bool = True) -> float:
    """Forward FLOPs one token costs (see the module docstring). ``causal=False`` counts every
    score of the s x s matrix (what a kernel that computes the masked half too performs)."""
    h, V = cfg.hidden_size, cfg.vocab_size
    k = experts_per_token
    if k is None:
        k = cfg.budget_target_ffn_experts if getattr(cfg, "budget_target_ffn_experts", None) else \
            (cfg.moe_router_topk if cfg.num_experts else 0)
    expert_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    if cfg.arch == "longcat":
        attn_lin = _mla_linear(cfg)
        core = _attention_core(cfg, seq_length, cfg.qk_head_dim, cfg.v_head_dim, causal)
        dense = 3 * h * cfg.ffn_hidden_size
        layer_dense = _layer_dense_macs(cfg)
        router = (cfg.num_experts + cfg.zero_expert_num) * h
        layer = 2 * (2 * attn_lin + 2 * layer_dense) + 2 * router + 2 * k * 3 * h * expert_ffn + 2 * core
        total = cfg.num_layers * layer + 2 * V * h
        if getattr(cfg, "ngram", None) is not None:
            from longcat_megatron.model.ngram_config import ngram_parameter_count

            total += 2 * ngram_parameter_count(cfg.ngram, V, h)[1]
        if cfg.mtp_num_layers:
            mtp = 2 * (attn_lin + dense + 2 * h * h) + core + 2 * V * h
            total += cfg.mtp_num_layers * mtp
        return float(total)
    head_dim = h // cfg.num_attention_heads
    core = _attention_core(cfg, seq_length, head_dim, head_dim, causal)
    mlp = 2 * k * 3 * h * expert_ffn + 2 * cfg.num_experts * h if cfg.num_experts else 2 * 3 * h * cfg.ffn_hidden_size
    layer = 2 * 4 * h * h + mlp + core
    return float(cfg.num_layers * layer + 2 * V * h)


def _layer_dense_macs(cfg) -> int:
    """Multiply-adds per token of one dense MLP of a shortcut layer: SwiGLU 3hF; with
    ``model.per_layer_embedding`` gate + down 2hF, plus (plne) the per-layer projections."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kind = getattr(cfg, "per_layer_embedding", "none")
    if kind == "none":
        return 3 * h * f
    if kind == "ple":
        return 2 * h * f
    from longcat_megatron.model.ngram_config import ngram_parameter_count

    return 2 * h * f + ngram_parameter_count(cfg.layer_ngram(), cfg.vocab_size, f)[1]


def training_flops_per_token(cfg, seq_length: int, experts_per_token: Optional[float] = None) -> float:
    """Forward + backward FLOPs per trained token (3 x forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_length, experts_per_token)


# Dense BF16 tensor-core peak per GPU (TFLOP/s, no sparsity), by a substring of the device name.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("GB200", 2500.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10", 125.0))


def peak_tflops_of(device_name: str) -> Optional[float]:
    """The known dense BF16 peak of a GPU by name, or None (then MFU is not shown)."""
    for needle, peak in PEAK_TFLOPS:
        if needle in device_name:
            return peak
    return None
