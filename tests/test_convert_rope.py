"""from_hf reads YaRN's ``rope_parameters`` faithfully: ``attention_factor`` and ``truncate`` are
honoured when they state what the model computes, refused with a clear message otherwise."""

import pytest

from ckpt_convert import ConversionError
from ckpt_convert.hf_config import model_config_from_hf
from longcat_megatron.model.hf_mapping import hf_config_kwargs
from longcat_megatron.model.rotary import rotary_amplitude
from tests.longcat_tiny import YARN, tiny_config


def _hf(**rope_extra) -> dict:
    kw = hf_config_kwargs(tiny_config(**YARN))
    kw["model_type"] = "longcat_flash"
    kw["rope_parameters"] = {**kw["rope_parameters"], **rope_extra}
    return kw


def test_derived_attention_factor_and_default_truncate_are_accepted():
    cfg = tiny_config(**YARN)
    imported = model_config_from_hf(_hf(attention_factor=rotary_amplitude(cfg), truncate=True))
    assert imported.rope_type == "yarn" and rotary_amplitude(imported) == rotary_amplitude(cfg)


def test_other_attention_factor_is_refused():
    with pytest.raises(ConversionError, match=r"config.json: rope_parameters.attention_factor=1.5"):
        model_config_from_hf(_hf(attention_factor=1.5))


def test_untruncated_yarn_is_refused():
    with pytest.raises(ConversionError, match=r"rope_parameters.truncate=False.*set it to true"):
        model_config_from_hf(_hf(truncate=False))
