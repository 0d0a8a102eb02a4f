"""LongCat config checks (clear errors naming the field) and the published parameter counts."""

import dataclasses

import pytest

from longcat_megatron.model.config import ModelConfigError
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


@pytest.mark.parametrize("path", ["configs/tiny_longcat.yaml", "configs/longcat_flash_lite.yaml",
                                  "configs/longcat_flash.yaml"])
def test_shipped_configs_load(path):
    from longcat_megatron.config import load_config

    cfg = load_config(path, ["data.mock=true"])
    assert cfg.model.arch == "longcat" and cfg.model.zero_expert_num > 0 and cfg.model.mtp_num_layers == 1


def _lite_summary():
    from longcat_megatron.config import load_config
    from longcat_megatron.model.summary import summarize

    return summarize(load_config("configs/longcat_flash_lite.yaml", ["data.mock=true"]).model)


def test_lite_summary_reproduces_published_counts():
    """LongCat-Flash-Lite paper: 37.15B backbone + embedding + head (MTP apart), 2.92-4.51B active."""
    s = run_distributed(_lite_summary, 1)[0]
    assert round(s["total"] / 1e9, 2) == 37.15
    assert round(s["activated_min"] / 1e9, 2) == 2.92
    assert round(s["activated_max"] / 1e9, 2) == 4.51
    assert s["mtp"] > 0
