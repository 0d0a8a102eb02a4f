"""Configuration of the N-gram Embedding (``model.ngram``) and the paper's sizing rules.

Field names follow the released HF config (``ngram_vocab_size_ratio``, ``emb_neighbor_num``,
``emb_split_num``). :func:`check_ngram_rules` implements the rules of "Scaling Embeddings Outperforms
Scaling Experts" (LongCat-Flash-Lite, §3): it raises :class:`NgramConfigError` for configs that cannot
work and returns warnings (strings starting with ``[rule-name]``) that ``silence`` can switch off.
"""

from __future__ import annotations

from longcat_megatron.errors import UserInputError

from dataclasses import dataclass, field
from typing import Any, Optional

from longcat_megatron.model.ngram_ids import ngram_moduli

AMPLIFICATIONS = ("none", "sqrt", "layernorm")
PARTITIONS = ("tensor", "tensor_data")

# Rule names accepted by NgramConfig.silence.
RULE_PARAMS_OVER_HALF = "ngram_params_over_half"
RULE_NEAR_VOCAB_MULTIPLE = "modulus_near_vocab_multiple"
RULE_WEAK_SHAPE = "weak_ngram_shape"
RULES = (RULE_PARAMS_OVER_HALF, RULE_NEAR_VOCAB_MULTIPLE, RULE_WEAK_SHAPE)

# A modulus within this fraction of V of an integer multiple of V is "close" (2-gram collisions
# spike there, P-Lite §3.2; the paper's recommended settings sit 0.2-0.57 V away).
NEAR_MULTIPLE_FRACTION = 0.05


class NgramConfigError(UserInputError):
    """Invalid N-gram Embedding configuration; the message names the field and the fix."""


@dataclass
class NgramConfig:
    """``model.ngram`` section. Lite: ratio 78, N=4, K=4, eos 2."""

    ngram_vocab_size_ratio: float = 78.0
    emb_neighbor_num: int = 4          # N: largest n-gram order, current token included
    emb_split_num: int = 4             # K: sub-tables per order
    eos_token_id: Optional[int] = 2    # document boundary of the hash; None: no reset
    amplification: str = "none"        # 'none' (released) | 'sqrt' (x sqrt(H)) | 'layernorm'
    partition: str = "tensor"          # rows over TP | 'tensor_data': over expert TP x EP ranks
    silence: list = field(default_factory=list)

    @property
    def num_tables(self) -> int:
        return self.emb_split_num * (self.emb_neighbor_num - 1)

    def moduli(self, vocab_size: int) -> list[int]:
        return ngram_moduli(vocab_size, self.ngram_vocab_size_ratio, self.emb_neighbor_num,
                            self.emb_split_num)


def ngram_parameter_count(ngram_cfg: NgramConfig, vocab_size: int, hidden_size: int) -> tuple[int, int]:
    """(sub-table parameters, projection parameters). Lite: (31,406,985,216, 9,437,184)."""
    width = hidden_size // ngram_cfg.num_tables
    tables = sum(ngram_cfg.moduli(vocab_size)) * width
    projections = ngram_cfg.num_tables * width * hidden_size
    return tables, projections


def _check_fields(cfg: NgramConfig, vocab_size: int, hidden_size: int, section: str,
                  width_field: str) -> None:
    def bad(name: str, msg: str) -> NgramConfigError:
        return NgramConfigError(f"{section}.{name}: {msg}")

    if cfg.emb_neighbor_num < 2:
        raise bad("emb_neighbor_num", f"{cfg.emb_neighbor_num} < 2; N counts the current token, use N >= 2")
    if cfg.emb_split_num < 1:
        raise bad("emb_split_num", f"{cfg.emb_split_num} < 1; use K >= 1")
    if not cfg.ngram_vocab_size_ratio > 0:
        raise bad("ngram_vocab_size_ratio", f"{cfg.ngram_vocab_size_ratio} must be > 0")
    if cfg.amplification not in AMPLIFICATIONS:
        raise bad("amplification", f"{cfg.amplification!r}: use one of {AMPLIFICATIONS}")
    if cfg.partition not in PARTITIONS:
        raise bad("partition", f"{cfg.partition!r}: use one of {PARTITIONS}")
    unknown = [r for r in cfg.silence if r not in RULES]
    if unknown:
        raise bad("silence", f"unknown rule(s) {unknown}; rules are {list(RULES)}")
    if cfg.eos_token_id is not None and not 0 <= cfg.eos_token_id < vocab_size:
        raise bad("eos_token_id", f"{cfg.eos_token_id} is outside the vocabulary [0, {vocab_size})")
    tables = cfg.num_tables
    if hidden_size % tables:
        lo = hidden_size - hidden_size % tables
        raise NgramConfigError(
            f"{width_field}={hidden_size} is not divisible by K*(N-1) = "
            f"{cfg.emb_split_num}*({cfg.emb_neighbor_num}-1) = {tables} sub-tables ({section}."
            f"emb_split_num / emb_neighbor_num); change {width_field.rsplit('.', 1)[-1]} to a multiple of {tables} "
            f"(e.g. {lo or tables}) or pick K, N with K*(N-1) dividing {hidden_size}"
        )


def check_ngram_rules(
    ngram_cfg: NgramConfig, model_cfg_like: Any, total_params: Optional[int] = None, *,
    section: str = "model.ngram", width_field: str = "model.hidden_size",
) -> list[str]:
    """Validate ``ngram_cfg`` against ``model_cfg_like`` (anything with ``vocab_size`` and
    ``hidden_size``: the output width). Raises :class:`NgramConfigError` on errors; returns the
    warnings that are not silenced. The 50% budget rule needs ``total_params`` (whole model) and is
    skipped without it. ``section`` / ``width_field`` name the config fields in the messages (the
    per-layer N-gram Embedding: ``model.per_layer_ngram`` / ``model.ffn_hidden_size``)."""
    vocab = int(model_cfg_like.vocab_size)
    hidden = int(model_cfg_like.hidden_size)
    _check_fields(ngram_cfg, vocab, hidden, section, width_field)
    warnings: list[str] = []

    def warn(rule: str, msg: str) -> None:
        if rule not in ngram_cfg.silence:
            warnings.append(f"[{rule}] {msg} (silence with {section}.silence: [{rule}])")

    if total_params:
        tables, projections = ngram_parameter_count(ngram_cfg, vocab, hidden)
        share = (tables + projections) / total_params
        if share > 0.5:
            warn(RULE_PARAMS_OVER_HALF,
                 f"N-gram Embedding holds {share:.1%} of the {total_params:,} parameters; the paper "
                 "advises at most 50% (lower ngram_vocab_size_ratio)")

    nearest = None
    for idx, mod in enumerate(ngram_cfg.moduli(vocab)):
        mult = max(1, round(mod / vocab))
        dist = abs(mod - mult * vocab)
        if nearest is None or dist < nearest[0]:
            nearest = (dist, idx, mod, mult)
    dist, idx, mod, mult = nearest
    if dist < NEAR_MULTIPLE_FRACTION * vocab:
        warn(RULE_NEAR_VOCAB_MULTIPLE,
             f"sub-table {idx} has M={mod:,} rows, {dist:,} ({dist / vocab:.3%} of V) from "
             f"{mult}*V={mult * vocab:,}; 2-gram collisions spike near integer multiples of the base "
             "vocabulary. A ratio with a fractional part near .5 (e.g. "
             f"{int(ngram_cfg.ngram_vocab_size_ratio)}.5) "
             "avoids it; released LongCat-Flash-Lite checkpoints use ratio 78 and need it unchanged")

    if ngram_cfg.emb_neighbor_num == 2 or ngram_cfg.emb_split_num == 1:
        warn(RULE_WEAK_SHAPE,
             f"N={ngram_cfg.emb_neighbor_num}, K={ngram_cfg.emb_split_num}: the paper found N=2 or K=1 "
             "clearly worse; use N in 3..5 and K >= 2")
    return warnings
