"""Hyperparameter transfer by width scaling (the ``transfer:`` section of a run config).

Tune ``optimizer.lr`` (and ``model.init_method_std``) on a narrow proxy (``python -m
longcat_megatron.proxy``), then train the wide model with the *same* values and
``transfer.base_hidden_size`` = the proxy's hidden size: each parameter class gets its
initialisation variance and learning rate multiplied by ``s ** -exponent``, where
``s = model.hidden_size / transfer.base_hidden_size`` is the width multiplier.

The rule table (:data:`RULES`) and where it comes from:

* LongCat-Flash report (reference ``longcat_architecture.md`` §3.7, secondary notes): width scaling
  s = 8 from a 768-wide proxy; "init variance and hidden/unembedding LR scaled by 1/s".
* μP for Adam (Yang et al., "Tensor Programs V", 2022, Table 3; Everett et al., "Scaling Exponents
  Across Parameterizations and Optimizers", 2024): input-like weights (embeddings) and vectors
  (norm gains, biases) keep init and LR; hidden matrices (fan-in ∝ width) get init variance ∝ 1/fan_in
  and Adam LR ∝ 1/fan_in. μP would initialise the unembedding with variance ∝ 1/s² (logits → 0 as
  width grows); the LongCat rule says 1/s, which keeps the logits' initial size equal to the proxy's
  (this is Everett et al.'s "standard parameterization + per-layer LR" variant). We follow LongCat.

Classes (:func:`param_class`): ``embedding`` = token embedding, N-gram sub-tables, MTP embedding;
``unembedding`` = the output layer; ``vector`` = any 1-D parameter (RMSNorm gains, biases);
``hidden`` = every other matrix: attention and MLA down/up projections, dense MLPs, FFN experts,
the router (fan-in = hidden size, like any hidden matrix), the N-gram projections (fan-in = table
width = H / tables) and the MTP ``eh_proj``. Zero experts have no parameters; the MLA q/kv scale
correction ``sqrt(H / lora_rank)`` stays constant when the proxy scales the LoRA ranks with H.

Initialisation enters megatron's ``TransformerConfig`` (``init_method_std`` = the hidden std,
``embedding_init_method_std`` = the embedding std; the output layer is initialised by
``init_method``, so the unembedding rule must equal the hidden one). Learning rates enter
megatron-core's optimizer parameter groups: :func:`optimizer_overrides` returns the
``config_overrides`` (``ParamKey`` -> ``max_lr`` / ``min_lr``) that ``get_megatron_optimizer``
turns into groups, which its ``OptimizerParamScheduler`` schedules like the default group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from longcat_megatron.errors import UserInputError


class TransferConfigError(UserInputError):
    """Invalid ``transfer`` settings; the message names the field and the fix."""


@dataclass
class TransferConfig:
    """``transfer:`` section. Off while ``base_hidden_size`` is null."""

    # Hidden size of the proxy whose optimizer.lr / model.init_method_std this run reuses (the
    # proxy's own config carries its hidden size here, i.e. s = 1). null = no transfer.
    base_hidden_size: Optional[int] = None
    # The width multiplier s = model.hidden_size / base_hidden_size. null: derived; set, it must
    # agree (a guard against a base that belongs to another proxy).
    width_scale: Optional[float] = None


@dataclass(frozen=True)
class Rule:
    """Multipliers ``s ** -init_variance_exp`` (init variance) and ``s ** -lr_exp`` (Adam LR)."""

    init_variance_exp: float
    lr_exp: float
    what: str


EMBEDDING, HIDDEN, UNEMBEDDING, VECTOR = "embedding", "hidden", "unembedding", "vector"
RULES = {
    EMBEDDING: Rule(0, 0, "token embedding, N-gram sub-tables, MTP embedding"),
    HIDDEN: Rule(1, 1, "attention/MLA, dense MLP, experts, router, N-gram and MTP projections"),
    UNEMBEDDING: Rule(1, 1, "output layer"),
    VECTOR: Rule(0, 0, "norm gains, biases (1-D)"),
}
# The output layer is initialised by megatron's ``init_method`` (the hidden std).
assert RULES[UNEMBEDDING].init_variance_exp == RULES[HIDDEN].init_variance_exp

_EMBEDDING_SUFFIXES = ("word_embeddings.weight", "ngram_tables", "mtp_head.embedding.weight")


def param_class(param, name: str) -> str:
    """The rule class of a parameter from its shape and (module-path) name; wrapper prefixes such
    as ``module.`` (DDP, Float16Module) do not matter."""
    if param.dim() < 2:
        return VECTOR
    if name.endswith("output_layer.weight"):
        return UNEMBEDDING
    if name.endswith(_EMBEDDING_SUFFIXES):
        return EMBEDDING
    return HIDDEN


def width_scale(cfg) -> float:
    """s for a RunConfig (1.0 with transfer off)."""
    t = cfg.transfer
    return 1.0 if t.base_hidden_size is None else cfg.model.hidden_size / t.base_hidden_size


def lr_multiplier(cls: str, s: float) -> float:
    return s ** -RULES[cls].lr_exp


def init_std(cls: str, base_std: float, s: float) -> float:
    """Initialisation std of class ``cls``: ``base_std * sqrt(s ** -init_variance_exp)``."""
    return base_std * math.sqrt(s ** -RULES[cls].init_variance_exp)


def init_stds(base_std: float, s: float) -> dict:
    """The megatron TransformerConfig fields that carry the rule's initialisation."""
    return {"init_method_std": init_std(HIDDEN, base_std, s),
            "embedding_init_method_std": init_std(EMBEDDING, base_std, s)}


def optimizer_overrides(cfg, opt_config) -> Optional[dict]:
    """megatron ``config_overrides`` for ``get_megatron_optimizer``: None with transfer off
    (megatron's defaults); else megatron's standard overrides (no weight decay on biases and 1-D
    parameters) plus one ``ParamKey`` per class whose LR multiplier is not 1 (``max_lr``/``min_lr``
    scaled, so warmup and decay follow the same schedule)."""
    if cfg.transfer.base_hidden_size is None:
        return None
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate, get_standard_config_overrides

    s = width_scale(cfg)
    overrides = get_standard_config_overrides(opt_config)
    for cls in RULES:
        mult = lr_multiplier(cls, s)
        if mult == 1.0:
            continue
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name=f"transfer_{cls}", fn=lambda p, n, cls=cls: param_class(p, n) == cls))
        overrides[key] = {"max_lr": opt_config.lr * mult, "min_lr": opt_config.min_lr * mult}
    return overrides


def validate_transfer(cfg) -> None:
    """Checks of the ``transfer`` section against the model (called by ``config.validate``)."""
    t, m = cfg.transfer, cfg.model
    if t.base_hidden_size is None:
        if t.width_scale is not None:
            raise TransferConfigError(
                f"transfer.width_scale={t.width_scale} without transfer.base_hidden_size: set "
                "transfer.base_hidden_size to the proxy's hidden size (or remove width_scale)")
        return
    if t.base_hidden_size < 1:
        raise TransferConfigError(f"transfer.base_hidden_size={t.base_hidden_size} must be >= 1 "
                                  "(the proxy's model.hidden_size), or null for no transfer")
    s = width_scale(cfg)
    if t.width_scale is not None and not math.isclose(t.width_scale, s, rel_tol=1e-9):
        raise TransferConfigError(
            f"transfer.width_scale={t.width_scale} but model.hidden_size / transfer.base_hidden_size "
            f"= {m.hidden_size} / {t.base_hidden_size} = {s:g}: fix one of them (or drop width_scale)")
    if not m.untie_embeddings_and_output_weights:
        raise TransferConfigError(
            "transfer.base_hidden_size is set but model.untie_embeddings_and_output_weights=false: a "
            "tied embedding/output matrix would need both the embedding and the unembedding rule; "
            "set model.untie_embeddings_and_output_weights=true")


def describe(cfg) -> list:
    """``--dry-run`` lines: the width multiplier and, per class, the init std and LR in use."""
    t = cfg.transfer
    if t.base_hidden_size is None:
        return ["  transfer: off (optimizer.lr and model.init_method_std apply to every parameter)"]
    s, o, std = width_scale(cfg), cfg.optimizer, cfg.model.init_method_std
    lines = [f"  transfer: width scale s = {cfg.model.hidden_size} / {t.base_hidden_size} = {s:g} "
             f"(optimizer.lr {o.lr:g}, model.init_method_std {std:g} are the proxy's)"]
    for cls, rule in RULES.items():
        init = "ones/zeros" if cls == VECTOR else f"{init_std(cls, std, s):.4g}"
        lines.append(f"    {cls:<11} init std {init:<10} lr {o.lr * lr_multiplier(cls, s):.4g} "
                     f"(min {o.min_lr * lr_multiplier(cls, s):.4g}): {rule.what}")
    return lines
