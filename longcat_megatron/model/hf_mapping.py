"""HF LongcatFlash checkpoint keys <-> this model's full (unsharded, TP=PP=EP=1) state-dict keys.

The HF side is the on-disk safetensors layout Meituan ships (per-expert keys, MTP under
``model.mtp.*``); see docs/model.md. Dense and expert SwiGLU ``linear_fc1`` = cat[gate, up] on our
side. The router's ``e_score_correction_bias`` is our ``expert_bias`` (N FFN + Z zero experts).
Budget-controller state has no HF key: :func:`hf_to_megatron` starts it at zero.

transformers 5.x keeps experts fused in memory (``gate_up_proj [N+Z, 2I, H]``, zero-expert rows
unused, ``down_proj [N, H, I]``); :func:`to_transformers_memory_layout` converts the file layout to
that for ``LongcatFlashForCausalLM.load_state_dict``.

A rule's HF side is one key, or a tuple of keys whose tensors, concatenated along dim 0 in that
order, give our tensor (:func:`row_splits` gives the row count of each part):

* SwiGLU ``linear_fc1`` = cat[gate, up] (two equal halves);
* with ``model.ngram`` (LongCat-Flash-Lite, ``model_type: longcat_flash_ngram``): our
  ``embedding.ngram_tables [sum M_i, D]`` = cat over i of ``model.ngram_embeddings.embedders.{i}.weight
  [M_i, D]``; sub-table i is rows ``[sum_{j<i} M_j, sum_{j<=i} M_j)`` (:func:`ngram_table_rows`, the
  same ranges as ``NgramEmbedding.table_row_ranges()`` and the global rows of its sharded-checkpoint
  tensor ``embedding.ngram_tables``). ``embedding.post_projs.{i}.weight [H, D]`` <->
  ``model.ngram_embeddings.post_projs.{i}.weight``; the base table ``embedding.word_embeddings`` <->
  ``model.embed_tokens`` (HF's ``ngram_embeddings.word_embeddings`` is the same module and is not
  stored). The MTP head's own embedding stays ``model.mtp.embed_tokens``. Amplified N-gram
  embeddings (``ngram.amplification`` other than ``none``) have no HF form and are refused.
"""

from __future__ import annotations

import re

import torch

from longcat_megatron.model.config import ModelConfig

_ATTN = {
    "linear_q_down_proj": "q_a_proj",
    "q_layernorm": "q_a_layernorm",
    "linear_q_up_proj": "q_b_proj",
    "linear_kv_down_proj": "kv_a_proj_with_mqa",
    "kv_layernorm": "kv_a_layernorm",
    "linear_kv_up_proj": "kv_b_proj",
    "linear_proj": "o_proj",
}


def _attention_rules(ours: str, hf: str):
    return [(f"{ours}.{a}.weight", f"{hf}.{b}.weight") for a, b in _ATTN.items()]


NGRAM_TABLES = "embedding.ngram_tables"


def ngram_table_rows(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(HF sub-table key, first row, end row) of each sub-table inside our concatenated
    ``embedding.ngram_tables``; empty without ``model.ngram``."""
    if cfg.ngram is None:
        return []
    out, start = [], 0
    for i, rows in enumerate(cfg.ngram.moduli(cfg.vocab_size)):
        out.append((f"model.ngram_embeddings.embedders.{i}.weight", start, start + rows))
        start += rows
    return out


def _ngram_rules(cfg: ModelConfig) -> list:
    if cfg.ngram is None:
        return []
    rules: list = [(NGRAM_TABLES, tuple(key for key, _, _ in ngram_table_rows(cfg)))]
    rules += [(f"embedding.post_projs.{i}.weight", f"model.ngram_embeddings.post_projs.{i}.weight")
              for i in range(cfg.ngram.num_tables)]
    return rules


def row_splits(ours: str, rows: int, parts: int, cfg: ModelConfig) -> list[int]:
    """Row counts of the ``parts`` HF tensors that make up our ``rows``-row tensor ``ours``."""
    if ours == NGRAM_TABLES:
        sizes = [end - start for _, start, end in ngram_table_rows(cfg)]
    else:
        sizes = [rows // parts] * parts
    if sum(sizes) != rows or len(sizes) != parts:
        raise ValueError(f"{ours!r} has {rows} rows; expected {sum(sizes)} in {parts} parts "
                         "(model config and checkpoint disagree?)")
    return sizes


def _check_convertible(cfg: ModelConfig) -> None:
    if cfg.ngram is not None and cfg.ngram.amplification != "none":
        raise ValueError(f"model.ngram.amplification={cfg.ngram.amplification!r}: HF LongCat-Flash-"
                         "Lite checkpoints have no embedding amplification; only 'none' converts")


def key_rules(cfg: ModelConfig) -> list[tuple[str, str | tuple[str, ...]]]:
    """(our full-model key, HF key or tuple of HF keys concatenated along rows) for every tensor
    of the model, N-gram Embedding included (see the module docstring)."""
    rules: list = [
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("final_layernorm.weight", "model.norm.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ]
    rules += _ngram_rules(cfg)
    for layer in range(cfg.num_layers):
        o, h = f"decoder.layers.{layer}", f"model.layers.{layer}"
        for s in (0, 1):
            rules += [
                (f"{o}.input_layernorm_{s}.weight", f"{h}.input_layernorm.{s}.weight"),
                (f"{o}.pre_mlp_layernorm_{s}.weight", f"{h}.post_attention_layernorm.{s}.weight"),
                (f"{o}.mlps_{s}.linear_fc1.weight",
                 (f"{h}.mlps.{s}.gate_proj.weight", f"{h}.mlps.{s}.up_proj.weight")),
                (f"{o}.mlps_{s}.linear_fc2.weight", f"{h}.mlps.{s}.down_proj.weight"),
            ]
            rules += _attention_rules(f"{o}.self_attention_{s}", f"{h}.self_attn.{s}")
        rules += [
            (f"{o}.mlp.router.weight", f"{h}.mlp.router.classifier.weight"),
            (f"{o}.mlp.router.expert_bias", f"{h}.mlp.router.e_score_correction_bias"),
        ]
        for e in range(cfg.num_experts):
            oe, he = f"{o}.mlp.experts.local_experts.{e}", f"{h}.mlp.experts.{e}"
            rules += [
                (f"{oe}.linear_fc1.weight", (f"{he}.gate_proj.weight", f"{he}.up_proj.weight")),
                (f"{oe}.linear_fc2.weight", f"{he}.down_proj.weight"),
            ]
    if cfg.mtp_num_layers:
        h = "model.mtp.layers.0"
        rules += [
            ("mtp_head.embedding.weight", "model.mtp.embed_tokens.weight"),
            ("mtp_head.enorm.weight", f"{h}.enorm.m.weight"),
            ("mtp_head.hnorm.weight", f"{h}.hnorm.m.weight"),
            ("mtp_head.eh_proj.weight", f"{h}.eh_proj.weight"),
            ("mtp_head.input_layernorm.weight", f"{h}.input_layernorm.weight"),
            ("mtp_head.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight"),
            ("mtp_head.mlp.linear_fc1.weight", (f"{h}.transformer_layer.mlp.gate_proj.weight",
                                           f"{h}.transformer_layer.mlp.up_proj.weight")),
            ("mtp_head.mlp.linear_fc2.weight", f"{h}.transformer_layer.mlp.down_proj.weight"),
            ("mtp_head.final_layernorm.weight", "model.mtp.norm.weight"),
        ]
        rules += _attention_rules("mtp_head.self_attention", f"{h}.self_attn")
    return rules


_rules = key_rules   # older name, used by ckpt_convert.layout


def _tensor_state(sd: dict) -> dict:
    """Drop non-tensor entries (megatron's ``_extra_state``)."""
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def megatron_to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our full state dict -> HF file-format tensors. Raises KeyError naming a missing key."""
    _check_convertible(cfg)
    state = _tensor_state(state)
    out = {}
    for ours, hf in key_rules(cfg):
        if ours not in state:
            raise KeyError(f"megatron_to_hf: {ours!r} missing from the state dict (model config "
                           "and checkpoint disagree?)")
        t = state[ours]
        if isinstance(hf, tuple):
            parts = torch.split(t, row_splits(ours, t.shape[0], len(hf), cfg), dim=0)
            out.update({key: part.clone() for key, part in zip(hf, parts)})
        else:
            out[hf] = t
    return out


def hf_to_megatron(hf: dict, cfg: ModelConfig) -> dict:
    """HF file-format tensors -> our full state dict (controller state starts at zero)."""
    _check_convertible(cfg)
    out = {}
    for ours, key in key_rules(cfg):
        keys = key if isinstance(key, tuple) else (key,)
        missing = [k for k in keys if k not in hf]
        if missing:
            raise KeyError(f"hf_to_megatron: HF key {missing[0]!r} not found (is model.mtp_num_layers, "
                           "model.ngram or the layer/expert count right for this checkpoint?)")
        out[ours] = torch.cat([hf[k] for k in keys], dim=0) if len(keys) > 1 else hf[keys[0]]
    if cfg.budget_target_ffn_experts is not None:
        for layer in range(cfg.num_layers):
            p = f"decoder.layers.{layer}.mlp.router.controller"
            out[f"{p}.prev_error"] = torch.zeros(cfg.num_experts, dtype=torch.float64)
            out[f"{p}.prev_prev_error"] = torch.zeros(cfg.num_experts, dtype=torch.float64)
            out[f"{p}.steps"] = torch.zeros((), dtype=torch.int64)
    return out


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def to_transformers_memory_layout(hf: dict, cfg: ModelConfig) -> dict:
    """File layout -> transformers 5.x in-memory LongcatFlash layout (fused experts, no MTP)."""
    out, experts = {}, {}
    for key, t in hf.items():
        m = _EXPERT.match(key)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        elif not key.startswith("model.mtp."):
            out[key] = t
    n, z = cfg.num_experts, cfg.zero_expert_num
    for prefix, parts in experts.items():
        gate_up = [torch.cat([parts[(e, "gate")], parts[(e, "up")]], dim=0) for e in range(n)]
        pad = torch.zeros_like(gate_up[0])
        out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up + [pad] * z)
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out


def from_transformers_memory_layout(mem: dict, cfg: ModelConfig) -> dict:
    """transformers 5.x in-memory layout -> file layout (zero-expert rows of gate_up dropped)."""
    out = {}
    inter = cfg.moe_ffn_hidden_size
    for key, t in mem.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e in range(cfg.num_experts):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e in range(cfg.num_experts):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[key] = t
    return out


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """``transformers.LongcatFlashConfig`` keyword arguments equal to ``cfg``; with ``model.ngram``
    also ``model_type: longcat_flash_ngram`` and the N-gram fields of the released config
    (``ngram_vocab_size_ratio``, ``emb_neighbor_num``, ``emb_split_num``)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": cfg.rotary_base, "factor": cfg.yarn_factor,
                "original_max_position_embeddings": cfg.yarn_original_max_position_embeddings,
                "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
                "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        moe_topk=cfg.moe_router_topk, n_routed_experts=cfg.num_experts,
        zero_expert_num=cfg.zero_expert_num, expert_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        routed_scaling_factor=cfg.routed_scaling_factor, rope_parameters=rope,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
    )
    if cfg.ngram is not None:
        ratio = cfg.ngram.ngram_vocab_size_ratio
        kwargs.update(model_type="longcat_flash_ngram",
                      ngram_vocab_size_ratio=int(ratio) if float(ratio).is_integer() else ratio,
                      emb_neighbor_num=cfg.ngram.emb_neighbor_num,
                      emb_split_num=cfg.ngram.emb_split_num)
    return kwargs
