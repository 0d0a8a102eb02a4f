"""The vanilla twin of an N-gram model: LongCat-Flash-Lite-Vanilla, the Lite paper's control.

The paper's control model has "exactly the same total parameters, obtained by turning all N-gram
embedding parameters into additional experts" (``../shared/seeds/000_eccb425cf682a096.txt``), trained
with the same recipe and data. :func:`vanilla_twin` makes that model from any N-gram config: the
N-gram Embedding removed (the plain token embedding stays), the FFN expert count raised to the
count whose total is nearest the original's (each added expert brings its FFN weights and one router
row in every layer), everything else kept: top-k, zero experts, the budget target, hence the same
activated parameters per token up to the routers' extra rows. ``expert_multiple`` keeps the count a
multiple of a layout's expert-parallel size (for Lite: 494 experts match best, 496 at EP16; the
nearest multiple of 64 is 3.5% off the total, which the twin would no longer be).
"""

from __future__ import annotations

import dataclasses

from longcat_megatron.model.param_count import total_parameters


def expert_parameters_all_layers(cfg) -> int:
    """What one more FFN expert adds to the model: its SwiGLU weights and its router row, per layer."""
    h = cfg.hidden_size
    return cfg.num_layers * (3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size) + h)


def vanilla_twin(cfg, expert_multiple: int = 1):
    """``cfg`` (a ModelConfig with ``ngram``) with its N-gram parameters spent on FFN experts."""
    from longcat_megatron.model.config import ModelConfigError

    if cfg.ngram is None:
        raise ModelConfigError("the vanilla twin is made from a model with an N-gram Embedding "
                               "(model.ngram); this one has none: it is its own vanilla model")
    if expert_multiple < 1:
        raise ModelConfigError(f"expert_multiple={expert_multiple} must be >= 1")
    target = total_parameters(cfg)
    plain = dataclasses.replace(cfg, ngram=None)
    per_expert = expert_parameters_all_layers(cfg)
    ideal = cfg.num_experts + (target - total_parameters(plain)) / per_expert
    low = int(ideal // expert_multiple) * expert_multiple
    candidates = [n for n in (low, low + expert_multiple) if n >= max(cfg.num_experts, expert_multiple)]
    best = min(candidates, key=lambda n: abs(total_parameters(dataclasses.replace(plain, num_experts=n)) - target))
    return dataclasses.replace(plain, num_experts=best)
