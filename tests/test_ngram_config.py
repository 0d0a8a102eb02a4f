"""The paper's N-gram Embedding rules: errors with the fix, warnings per rule, silencing."""

from types import SimpleNamespace

import pytest

from longcat_megatron.model.ngram_config import (
    NgramConfig,
    NgramConfigError,
    check_ngram_rules,
    ngram_parameter_count,
)

LITE_MODEL = SimpleNamespace(vocab_size=131072, hidden_size=3072)


def rules_hit(warnings):
    return sorted(w.split("]")[0].lstrip("[") for w in warnings)


def test_lite_parameter_count():
    tables, projections = ngram_parameter_count(NgramConfig(), 131072, 3072)
    assert tables == 31_406_985_216          # paper: 31.4B
    assert projections == 12 * 256 * 3072


def test_lite_is_near_vocab_multiple_and_says_how_close():
    warns = check_ngram_rules(NgramConfig(), LITE_MODEL)
    assert rules_hit(warns) == ["modulus_near_vocab_multiple"]
    assert "78*V=10,223,616" in warns[0] and "1 (0.001% of V)" in warns[0]


def test_fractional_ratio_far_from_multiple_is_quiet():
    assert check_ngram_rules(NgramConfig(ngram_vocab_size_ratio=78.5), LITE_MODEL) == []


def test_params_over_half():
    cfg = NgramConfig(ngram_vocab_size_ratio=78.5)
    tables, proj = ngram_parameter_count(cfg, 131072, 3072)
    assert rules_hit(check_ngram_rules(cfg, LITE_MODEL, total_params=int((tables + proj) * 1.9))) == [
        "ngram_params_over_half"]
    assert check_ngram_rules(cfg, LITE_MODEL, total_params=int((tables + proj) * 2.1)) == []


@pytest.mark.parametrize("n,k", [(2, 4), (4, 1)])
def test_weak_shape_warning_and_silence(n, k):
    model = SimpleNamespace(vocab_size=1000, hidden_size=48)
    cfg = NgramConfig(ngram_vocab_size_ratio=3.5, emb_neighbor_num=n, emb_split_num=k)
    assert rules_hit(check_ngram_rules(cfg, model)) == ["weak_ngram_shape"]
    cfg.silence = ["weak_ngram_shape"]
    assert check_ngram_rules(cfg, model) == []


def test_hidden_not_divisible_is_error_with_fix():
    with pytest.raises(NgramConfigError, match="not divisible by K\\*\\(N-1\\).*multiple of 12"):
        check_ngram_rules(NgramConfig(), SimpleNamespace(vocab_size=131072, hidden_size=3070))


@pytest.mark.parametrize("field,value,match", [
    ("partition", "rows", "partition"),
    ("amplification", "x2", "amplification"),
    ("silence", ["no_such_rule"], "silence"),
    ("emb_neighbor_num", 1, "emb_neighbor_num"),
])
def test_bad_fields_name_the_field(field, value, match):
    cfg = NgramConfig(**{field: value})
    with pytest.raises(NgramConfigError, match=f"model.ngram.{match}"):
        check_ngram_rules(cfg, LITE_MODEL)
