"""LongCat config checks (clear errors naming the field) and the published parameter counts."""

import dataclasses
import warnings

import pytest

from longcat_megatron.model.config import ModelConfigError, NgramRuleWarning
from tests.harness import run_distributed
from tests.longcat_tiny import tiny_config


@pytest.mark.parametrize("overrides,field", [
    (dict(qk_rope_head_dim=3), "model.qk_rope_head_dim"),
    (dict(moe_router_topk=7), "model.moe_router_topk"),
    (dict(rope_type="ntk"), "model.rope_type"),
    (dict(budget_target_ffn_experts=5.0), "model.budget_target_ffn_experts"),
    (dict(device_lb_loss_coeff=0.1, device_lb_groups=3, budget_target_ffn_experts=2.0),
     "model.device_lb_groups"),
    (dict(mtp_num_layers=2), "model.mtp_num_layers"),
    (dict(num_experts=None), "model.num_experts"),
])
def test_bad_longcat_fields_name_the_field(overrides, field):
    cfg = dataclasses.replace(tiny_config(), **overrides)
    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        cfg.validate()


def test_topk_counts_zero_experts():
    tiny_config(moe_router_topk=6).validate()   # 4 FFN + 2 zero experts: top-6 is allowed


@pytest.mark.parametrize("path,ngram", [
    ("configs/tiny_longcat.yaml", False), ("configs/tiny_longcat_ngram.yaml", True),
    ("configs/longcat_flash_lite.yaml", True), ("configs/longcat_flash.yaml", False)])
def test_shipped_configs_load(path, ngram):
    from longcat_megatron.config import load_config
    from longcat_megatron.model.ngram_config import NgramConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", NgramRuleWarning)   # shipped configs raise no rule warning
        cfg = load_config(path, ["data.mock=true"])
    assert cfg.model.arch == "longcat" and cfg.model.zero_expert_num > 0 and cfg.model.mtp_num_layers == 1
    assert isinstance(cfg.model.ngram, NgramConfig) if ngram else cfg.model.ngram is None


def test_ngram_section_from_yaml_and_overrides():
    from longcat_megatron.config import load_config
    from longcat_megatron.model.ngram_config import NgramConfigError

    cfg = load_config("configs/tiny_longcat.yaml",
                      ["data.mock=true", "model.ngram.emb_split_num=2", "model.ngram.emb_neighbor_num=3",
                       "model.ngram.ngram_vocab_size_ratio=3.3"])
    assert (cfg.model.ngram.emb_split_num, cfg.model.ngram.eos_token_id) == (2, 2)
    assert load_config("configs/tiny_longcat_ngram.yaml", ["model.ngram=null"]).model.ngram is None
    with pytest.raises(NgramConfigError, match=r"model\.hidden_size=64 is not divisible by K\*\(N-1\)"):
        load_config("configs/tiny_longcat_ngram.yaml", ["model.ngram.emb_split_num=3"])


def test_ngram_rules_warn_and_can_be_silenced():
    from longcat_megatron.model.ngram_config import NgramConfig

    near = NgramConfig(ngram_vocab_size_ratio=3.0, emb_neighbor_num=3, emb_split_num=2)
    with pytest.warns(NgramRuleWarning, match="modulus_near_vocab_multiple"):
        tiny_config(ngram=near).validate()
    # tables of ~30x the 96-token vocabulary outweigh the tiny backbone: the paper's 50% rule
    big = NgramConfig(ngram_vocab_size_ratio=30.5, emb_neighbor_num=3, emb_split_num=2)
    with pytest.warns(NgramRuleWarning, match="ngram_params_over_half"):
        tiny_config(ngram=big).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NgramRuleWarning)
        tiny_config(ngram=NgramConfig(ngram_vocab_size_ratio=30.5, emb_neighbor_num=3, emb_split_num=2,
                                      silence=["ngram_params_over_half"])).validate()
    with pytest.raises(ModelConfigError, match="arch: longcat"):
        dataclasses.replace(tiny_config(ngram=big), arch="gpt").validate()


def _lite_summary():
    from longcat_megatron.config import load_config
    from longcat_megatron.model.summary import summarize, total_parameters

    cfg = load_config("configs/longcat_flash_lite.yaml", ["data.mock=true"]).model
    return summarize(cfg), total_parameters(cfg), cfg.ngram.moduli(cfg.vocab_size)


def test_lite_summary_reproduces_published_counts():
    """LongCat-Flash-Lite paper: 68.5B total with 31.4B in the N-gram Embedding (MTP apart),
    2.9-4.5B activated; reference §2.2/§4.3 give 68.56B, 31.41B, 2.92-4.51B."""
    s, analytic, moduli = run_distributed(_lite_summary, 1)[0]
    assert round(s["total"] / 1e9, 2) == 68.56 and analytic == s["total"]
    assert round(s["parts"]["N-gram tables"] / 1e9, 2) == 31.41
    assert s["parts"]["N-gram projections"] == 12 * 256 * 3072
    assert (len(moduli), moduli[0], moduli[-1]) == (12, 10_223_617, 10_223_639)
    assert s["parts"]["N-gram tables"] == sum(moduli) * 256
    assert round(s["activated_min"] / 1e9, 2) == 2.92
    assert round(s["activated_max"] / 1e9, 2) == 4.51
    assert s["mtp"] > 0


def _tiny_totals():
    from longcat_megatron.model.ngram_config import NgramConfig
    from longcat_megatron.model.summary import summarize, total_parameters

    ngram = NgramConfig(ngram_vocab_size_ratio=3.3, emb_neighbor_num=3, emb_split_num=2)
    out = []
    for cfg in (tiny_config(), tiny_config(mtp_num_layers=1, ngram=ngram),
                tiny_config(ngram=dataclasses.replace(ngram, amplification="layernorm"))):
        out.append((summarize(cfg)["total"], total_parameters(cfg)))
    return out


def test_analytic_total_equals_built_model():
    """The total used by the 50% rule (no model built) == the meta-device model's count."""
    for built, analytic in run_distributed(_tiny_totals, 1)[0]:
        assert built == analytic
