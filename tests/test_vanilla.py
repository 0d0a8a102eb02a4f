"""LongCat-Flash-Lite-Vanilla (model/vanilla.py, configs/longcat_flash_lite_vanilla.yaml): the Lite
paper's control, the same total parameters with the N-gram Embedding's parameters as FFN experts.

* Lite and its twin at EP16, both built on the meta device: totals within 0.5%, activated parameters
  per token (k = 0, top-k, the budget target) within 0.5%, no N-gram parameters left;
* the twin's expert count is the nearest to the original total (within half an expert of it), for
  Lite and for the tiny N-gram config;
* the committed vanilla config is exactly the twin of the Lite config (model) and Lite's recipe
  otherwise (only parallel.expert differs): the two files cannot drift apart;
* ``summary --vanilla`` prints the comparison; a model without an N-gram Embedding is a clear error.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITE = os.path.join(ROOT, "configs", "longcat_flash_lite.yaml")
VANILLA = os.path.join(ROOT, "configs", "longcat_flash_lite_vanilla.yaml")
TINY = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")


def _config(path: str):
    from longcat_megatron.config import load_config

    return load_config(path, ["data.mock=true"])


@pytest.fixture(scope="module")
def lite_pair():
    from longcat_megatron import runtime
    from longcat_megatron.model.summary import summarize
    from longcat_megatron.model.vanilla import vanilla_twin

    lite = _config(LITE).model
    twin = vanilla_twin(lite, expert_multiple=16)
    try:
        return lite, twin, summarize(lite), summarize(twin)
    finally:
        runtime.shutdown()


def test_twin_has_the_same_total_and_activated_parameters(lite_pair):
    lite, twin, s, t = lite_pair
    assert (lite.num_experts, twin.num_experts, twin.ngram) == (256, 496, None)
    assert s["ngram"] > 0.4 * s["total"] and t["ngram"] == 0
    assert abs(t["total"] / s["total"] - 1) < 0.005
    for key in ("activated_min", "activated_max", "activated_at_target"):
        assert abs(t[key] / s[key] - 1) < 0.005, key


@pytest.mark.parametrize("path,multiple", [(LITE, 1), (LITE, 16), (TINY, 1)])
def test_twin_expert_count_is_the_nearest_to_the_total(path, multiple):
    import dataclasses

    from longcat_megatron.model.param_count import total_parameters
    from longcat_megatron.model.vanilla import expert_parameters_all_layers, vanilla_twin

    cfg = _config(path).model
    twin = vanilla_twin(cfg, multiple)
    target, per = total_parameters(cfg), expert_parameters_all_layers(cfg)
    assert twin.num_experts % multiple == 0
    assert abs(total_parameters(twin) - target) <= multiple * per / 2
    for other in (twin.num_experts - multiple, twin.num_experts + multiple):  # no better multiple
        alt = total_parameters(dataclasses.replace(twin, num_experts=other))
        assert abs(alt - target) >= abs(total_parameters(twin) - target)


def test_committed_vanilla_config_is_the_twin_of_the_lite_config():
    import dataclasses

    from longcat_megatron.model.vanilla import vanilla_twin

    lite, vanilla = _config(LITE), _config(VANILLA)
    assert vanilla.model == vanilla_twin(lite.model, expert_multiple=vanilla.parallel.expert)
    assert dataclasses.replace(vanilla.parallel, expert=lite.parallel.expert) == lite.parallel
    for section in ("train", "optimizer", "schedule", "data", "checkpoint", "logging"):
        assert getattr(vanilla, section) == getattr(lite, section), section


def test_summary_compares_and_refuses_a_model_without_ngram(capsys):
    from longcat_megatron.model.summary import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["--config", TINY, "--vanilla"]) == 0
    out = text.getvalue()
    assert "vanilla twin (the N-gram Embedding's parameters as FFN experts):" in out
    from longcat_megatron.model.vanilla import vanilla_twin

    twin = vanilla_twin(_config(TINY).model)
    row = next(line for line in out.splitlines() if line.startswith("FFN experts"))
    assert row.split()[2:] == ["8", str(twin.num_experts), f"+{twin.num_experts - 8}"], row
    assert "activated (k=4)" in out and "N-gram share" in out
    assert main(["--config", os.path.join(ROOT, "configs", "tiny_longcat.yaml"), "--vanilla"]) == 2
    assert "has none: it is its own vanilla model" in capsys.readouterr().err
