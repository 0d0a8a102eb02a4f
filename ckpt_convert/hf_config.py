"""HF ``config.json`` / ``generation_config.json`` <-> the project's :class:`ModelConfig`.

Plain LongCat models export as ``model_type: longcat_flash`` (transformers' built-in
``LongcatFlashForCausalLM``); models with N-gram Embedding as ``longcat_flash_ngram`` with the remote
code of ``ckpt_convert/hf_remote`` copied next to the weights (``auto_map``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from ckpt_convert import ConversionError

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_FILES = ("configuration_longcat_ngram.py", "modeling_longcat_ngram.py")
AUTO_MAP = {
    "AutoConfig": "configuration_longcat_ngram.LongcatFlashNgramConfig",
    "AutoModel": "modeling_longcat_ngram.LongcatFlashNgramModel",
    "AutoModelForCausalLM": "modeling_longcat_ngram.LongcatFlashNgramForCausalLM",
}
# Fields of later LongCat releases that the Lite semantics (and this converter) do not implement.
UNSUPPORTED_NGRAM_FIELDS = ("ngram_exclude_sp_token", "special_token_scope", "ignored_token_ids",
                            "ngram_fix_normalize_factor", "oe_hidden_dim")
# HF builds the q/kv latent RMSNorms with its default eps.
HF_MLA_NORM_EPS = 1e-6


def ngram_of(cfg) -> Optional[object]:
    """The ``model.ngram`` section of a ModelConfig, or None for plain models."""
    return getattr(cfg, "ngram", None)


def check_exportable(cfg) -> None:
    """Raise ConversionError for settings transformers' LongcatFlash cannot express."""
    if cfg.arch != "longcat":
        raise ConversionError(f"model.arch={cfg.arch!r}: only arch 'longcat' checkpoints convert to HF")
    if not (cfg.mla_scale_q_lora and cfg.mla_scale_kv_lora):
        raise ConversionError("model.mla_scale_q_lora/mla_scale_kv_lora=false: transformers' "
                              "LongcatFlash always applies the MLA scale correction")
    if abs(cfg.mla_norm_epsilon - HF_MLA_NORM_EPS) > 1e-12:
        raise ConversionError(f"model.mla_norm_epsilon={cfg.mla_norm_epsilon}: transformers' "
                              f"LongcatFlash uses {HF_MLA_NORM_EPS} for the q/kv latent norms")
    if cfg.untie_embeddings_and_output_weights is False:
        raise ConversionError("model.untie_embeddings_and_output_weights=false: LongCat exports "
                              "untied embeddings only")
    ng = ngram_of(cfg)
    if ng is not None and getattr(ng, "amplification", "none") != "none":
        raise ConversionError(f"model.ngram.amplification={ng.amplification!r}: the released "
                              "N-gram semantics (and the exported remote code) have no amplification")


def build_hf_config(cfg, *, bos_token_id: int = 1, eos_token_id: Optional[int] = 2,
                    dtype: str = "float32"):
    """transformers config object for ``cfg`` (LongcatFlashConfig or LongcatFlashNgramConfig)."""
    from longcat_megatron.model.hf_mapping import hf_config_kwargs

    check_exportable(cfg)
    kwargs = hf_config_kwargs(cfg)
    for key in ("model_type", "ngram_vocab_size_ratio", "emb_neighbor_num", "emb_split_num"):
        kwargs.pop(key, None)  # set below from cfg.ngram, by the config class
    kwargs.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  initializer_range=cfg.init_method_std)
    ng = ngram_of(cfg)
    if ng is None:
        from transformers import LongcatFlashConfig

        config = LongcatFlashConfig(**kwargs)
        config.architectures = ["LongcatFlashForCausalLM"]
    else:
        from ckpt_convert.hf_remote.configuration_longcat_ngram import LongcatFlashNgramConfig

        ratio = ng.ngram_vocab_size_ratio
        ratio = int(ratio) if float(ratio).is_integer() else float(ratio)
        if ng.eos_token_id is not None:
            kwargs["eos_token_id"] = ng.eos_token_id
        config = LongcatFlashNgramConfig(ngram_vocab_size_ratio=ratio,
                                         emb_neighbor_num=ng.emb_neighbor_num,
                                         emb_split_num=ng.emb_split_num, **kwargs)
        config.architectures = ["LongcatFlashNgramForCausalLM"]
        config.auto_map = dict(AUTO_MAP)
    if cfg.mtp_num_layers:
        config.num_nextn_predict_layers = cfg.mtp_num_layers
    config.dtype = dtype
    return config


def write_hf_config(out_dir: str, cfg, *, bos_token_id: int = 1, eos_token_id: Optional[int] = 2,
                    dtype: str = "float32") -> dict:
    """Write config.json, generation_config.json (and the remote code for N-gram models)."""
    config = build_hf_config(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype)
    config.save_pretrained(out_dir)
    if ngram_of(cfg) is not None:
        install_remote_code(out_dir)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "do_sample": False, "_from_model_config": True}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return json.load(open(os.path.join(out_dir, "config.json")))


def install_remote_code(out_dir: str) -> None:
    """Copy the N-gram remote code into ``out_dir`` and point config.json's ``auto_map`` at it."""
    for name in REMOTE_FILES:
        shutil.copy(os.path.join(REMOTE_DIR, name), os.path.join(out_dir, name))
    path = os.path.join(out_dir, "config.json")
    config = json.load(open(path))
    config["auto_map"] = dict(AUTO_MAP)
    config["architectures"] = ["LongcatFlashNgramForCausalLM"]
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _check_yarn_extras(rope: dict, kw: dict, source: str) -> None:
    """``rope_parameters`` fields of transformers' YaRN that the model does not take as settings:
    accepted when they state what the model computes anyway, refused otherwise (silently ignoring
    them would change every attention score)."""
    import dataclasses

    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.rotary import rotary_amplitude

    if rope.get("truncate", True) is not True:
        raise ConversionError(
            f"{source}: rope_parameters.truncate={rope['truncate']!r}: the model rounds YaRN's "
            "correction range to whole dimensions (transformers' default truncate=true) and has no "
            "setting for the untruncated range; remove the field or set it to true")
    given = rope.get("attention_factor")
    if given is not None:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        implied = rotary_amplitude(ModelConfig(**{k: v for k, v in kw.items() if k in fields}))
        if abs(float(given) - implied) > 1e-6 * max(1.0, abs(implied)):
            raise ConversionError(
                f"{source}: rope_parameters.attention_factor={given} differs from {implied:.8g}, "
                "the value YaRN derives from factor/mscale/mscale_all_dim (which the model applies); "
                "an explicit attention_factor is not supported: remove the field to use the derived "
                "value, or convert with mscale/mscale_all_dim that give it")


def model_config_from_hf(hf: dict, source: str = "config.json"):
    """ModelConfig (``arch: longcat``) equal to an HF LongcatFlash / Ngram config dict."""
    from longcat_megatron.model.config import ModelConfig

    model_type = hf.get("model_type")
    if model_type not in ("longcat_flash", "longcat_flash_ngram"):
        raise ConversionError(f"{source}: model_type={model_type!r}; expected longcat_flash or "
                              "longcat_flash_ngram")
    bad = [k for k in UNSUPPORTED_NGRAM_FIELDS if hf.get(k) not in (None, False)]
    if bad:
        raise ConversionError(f"{source}: field(s) {bad} belong to later LongCat N-gram variants "
                              "that this converter does not implement")

    def need(name: str, *aliases: str):
        for key in (name, *aliases):
            if key in hf and hf[key] is not None:
                return hf[key]
        raise ConversionError(f"{source}: required field '{name}' is missing")

    heads = need("num_attention_heads")
    if hf.get("num_key_value_heads", heads) != heads:
        raise ConversionError(f"{source}: num_key_value_heads != num_attention_heads is not LongCat MLA")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    kw = dict(
        arch="longcat", vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        num_layers=need("num_layers"), num_attention_heads=heads,
        ffn_hidden_size=need("ffn_hidden_size", "intermediate_size"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=hf.get("rms_norm_eps", 1e-5), rotary_base=float(rope_theta),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        num_experts=need("n_routed_experts", "num_local_experts"),
        zero_expert_num=hf.get("zero_expert_num") or 0,
        moe_router_topk=need("moe_topk", "num_experts_per_tok"),
        moe_ffn_hidden_size=need("expert_ffn_hidden_size", "moe_intermediate_size"),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        q_lora_rank=need("q_lora_rank"), kv_lora_rank=need("kv_lora_rank"),
        qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
        v_head_dim=need("v_head_dim"), mla_norm_epsilon=HF_MLA_NORM_EPS,
        mtp_num_layers=int(hf.get("num_nextn_predict_layers") or 0),
    )
    if rope_type == "yarn":
        kw.update(rope_type="yarn", yarn_factor=float(rope["factor"]),
                  yarn_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 4096)),
                  yarn_beta_fast=float(rope.get("beta_fast", 32.0)),
                  yarn_beta_slow=float(rope.get("beta_slow", 1.0)),
                  yarn_mscale=float(rope.get("mscale", 1.0)),
                  yarn_mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
        _check_yarn_extras(rope, kw, source)
    elif rope_type != "default":
        raise ConversionError(f"{source}: rope type {rope_type!r} is not supported (default or yarn)")
    if hf.get("head_dim") not in (None, kw["qk_rope_head_dim"]):
        raise ConversionError(f"{source}: head_dim={hf['head_dim']} must equal qk_rope_head_dim="
                              f"{kw['qk_rope_head_dim']} (transformers sizes RoPE by head_dim)")
    cfg = ModelConfig(**kw)
    if model_type == "longcat_flash_ngram":
        try:
            from longcat_megatron.model.ngram_config import NgramConfig
        except ImportError as e:  # pragma: no cover
            raise ConversionError(f"N-gram models need longcat_megatron.model.ngram_config ({e})") from None
        if not hasattr(cfg, "ngram"):
            raise ConversionError("this version of ModelConfig has no 'ngram' section; N-gram "
                                  "checkpoints cannot be imported yet")
        eos = hf.get("eos_token_id")
        cfg.ngram = NgramConfig(ngram_vocab_size_ratio=float(need("ngram_vocab_size_ratio")),
                                emb_neighbor_num=int(need("emb_neighbor_num")),
                                emb_split_num=int(need("emb_split_num")),
                                eos_token_id=eos[0] if isinstance(eos, list) else eos)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    return cfg
