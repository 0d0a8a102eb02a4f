"""The study spec (YAML) and the matched model configs it derives.

A spec names a base run config (``base``: model/train/optimizer/... sections as in ``configs/``),
the corpus, where runs and the report go, and a list of ``runs``. Each run starts from ``base`` and
changes only what it names:

* ``strategy``: its label (one line per strategy in the ratio plot; e.g. ``vanilla``, ``experts``,
  ``ngram``, ``nk``, ``amplification``, ``vocab``);
* ``ngram``: ``model.ngram`` fields (``emb_neighbor_num``, ``emb_split_num``, ``amplification``,
  ``ngram_vocab_size_ratio``, ...); present = the run has an N-gram Embedding;
* ``model``: other ``model`` fields (e.g. ``num_experts``);
* ``target_ratio`` + ``scale``: the total/activated ratio to reach, by solving for
  ``model.num_experts`` (``scale: experts``) or ``model.ngram.ngram_vocab_size_ratio``
  (``scale: ngram``); the activated parameters stay those of the base (same top-k, zero experts
  and budget target; the N-gram Embedding is a lookup and not counted as activated);
* ``overrides``: any other ``section.field=value`` strings for this run.

The counts are those of ``model/param_count.py`` (total) and ``model/summary.py``'s convention
(activated per token at the budget target, input embedding excluded), checked against the meta-device
build in tests/test_study.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from longcat_megatron.errors import UserInputError

STRATEGY_SCALES = ("experts", "ngram")
OFF_MULTIPLE = 0.1  # solved N-gram ratios keep this far (in V) from an integer multiple of V
DEFAULT_SILENCE = ["ngram_params_over_half", "modulus_near_vocab_multiple", "weak_ngram_shape"]


class StudySpecError(UserInputError):
    """An invalid study spec; the message names the field."""


@dataclass
class CorpusSpec:
    # Either an existing tokenized dataset (prefix + tokenizer) or the built-in tiny corpus.
    prefix: Optional[str] = None
    tokenizer: Optional[str] = None
    tiny_max_mb: float = 3.0           # data_tools.tiny_corpus --max-mb
    split: str = "95,5,0"              # data.split: train/valid/test parts
    diagnostics_sequences: int = 200   # documents hashed for the collision statistics


@dataclass
class LaunchSpec:
    nproc: int = 1                     # processes per run (torchrun when > 1)
    overrides: list = field(default_factory=list)   # section.field=value for every run
    max_attempts: int = 3              # tries of a run that stops early after saving (exit 75/76) or is killed


@dataclass
class RunSpec:
    name: str
    strategy: str
    ngram: Optional[dict] = None
    model: dict = field(default_factory=dict)
    target_ratio: Optional[float] = None
    scale: Optional[str] = None
    overrides: list = field(default_factory=list)


@dataclass
class Spec:
    name: str
    base: dict
    runs: list
    runs_dir: str
    report: str
    figures_dir: str
    corpus: CorpusSpec
    launch: LaunchSpec
    path: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False)


def _bad(where: str, msg: str) -> StudySpecError:
    return StudySpecError(f"study spec: {where}: {msg}")


def _section(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad(where, f"must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", f"unknown field; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise _bad(where, str(e)) from None


def load_spec(path: str) -> Spec:
    if not os.path.isfile(path):
        raise StudySpecError(f"study spec {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise StudySpecError(f"study spec {path}: not valid YAML: {e}") from None
    return parse_spec(raw, path)


def parse_spec(raw: dict, path: Optional[str] = None) -> Spec:
    if not isinstance(raw, dict):
        raise _bad("(top level)", "must be a mapping")
    known = {"name", "base", "runs", "runs_dir", "report", "figures_dir", "corpus", "launch"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _bad(unknown[0], f"unknown field; known: {sorted(known)}")
    for req in ("name", "base", "runs"):
        if req not in raw:
            raise _bad(req, "missing (required)")
    name = raw["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise _bad("name", f"{name!r}: use letters, digits, '-' and '_' (it names files)")
    base = raw["base"]
    if not isinstance(base, dict) or not isinstance(base.get("model"), dict):
        raise _bad("base.model", "missing: the base run config needs a model section")
    if base["model"].get("arch") != "longcat":
        raise _bad("base.model.arch", f"{base['model'].get('arch')!r}: the study needs arch: longcat")
    if "ngram" in base["model"]:
        raise _bad("base.model.ngram", "the base is the vanilla MoE; give model.ngram per run (runs[i].ngram)")
    train = base.get("train") or {}
    ev, iters = train.get("eval_interval", 0), train.get("train_iters", 100)
    if not ev or iters % ev:
        raise _bad("base.train.eval_interval", f"{ev!r}: must be > 0 and divide train.train_iters={iters} "
                   "(the final validation loss is taken at the last iteration)")
    runs_raw = raw["runs"]
    if not isinstance(runs_raw, list) or not runs_raw:
        raise _bad("runs", "must be a non-empty list")
    runs, seen = [], set()
    for i, r in enumerate(runs_raw):
        where = f"runs[{i}]"
        if not isinstance(r, dict):
            raise _bad(where, "must be a mapping")
        for req in ("name", "strategy"):
            if req not in r:
                raise _bad(f"{where}.{req}", "missing (required)")
        run = _section(RunSpec, r, where)
        if not str(run.name).replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise _bad(f"{where}.name", f"{run.name!r}: use letters, digits, '.', '-' and '_'")
        if run.name in seen:
            raise _bad(f"{where}.name", f"{run.name!r} used twice")
        seen.add(run.name)
        if (run.target_ratio is None) != (run.scale is None):
            raise _bad(f"{where}.scale", "target_ratio and scale go together")
        if run.scale is not None and run.scale not in STRATEGY_SCALES:
            raise _bad(f"{where}.scale", f"{run.scale!r}: use one of {STRATEGY_SCALES}")
        if run.scale == "ngram" and run.ngram is None:
            raise _bad(f"{where}.ngram", "scale: ngram needs an ngram section (may be {})")
        if run.target_ratio is not None and not (isinstance(run.target_ratio, (int, float)) and run.target_ratio > 1):
            raise _bad(f"{where}.target_ratio", f"{run.target_ratio!r}: a total/activated ratio > 1")
        if run.ngram is not None and not isinstance(run.ngram, dict):
            raise _bad(f"{where}.ngram", "must be a mapping of model.ngram fields")
        if not isinstance(run.model, dict) or "ngram" in run.model:
            raise _bad(f"{where}.model", "a mapping of model fields (the N-gram section goes in ngram)")
        runs.append(run)
    stem = name
    spec = Spec(
        name=name, base=base, runs=runs,
        runs_dir=raw.get("runs_dir", f"runs/{stem}"),
        report=raw.get("report", f"docs/{stem}.md"),
        figures_dir=raw.get("figures_dir", "docs/figures"),
        corpus=_section(CorpusSpec, raw.get("corpus"), "corpus"),
        launch=_section(LaunchSpec, raw.get("launch"), "launch"),
        path=path, raw=raw,
    )
    if (spec.corpus.prefix is None) != (spec.corpus.tokenizer is None):
        raise _bad("corpus.tokenizer", "corpus.prefix and corpus.tokenizer go together "
                   "(leave both out for the built-in tiny corpus)")
    if spec.launch.nproc < 1:
        raise _bad("launch.nproc", f"{spec.launch.nproc}: must be >= 1")
    # Build every run's model now: a bad field fails before anything trains.
    for i, run in enumerate(runs):
        try:
            run_model(spec, run)
        except StudySpecError:
            raise
        except UserInputError as e:
            raise _bad(f"runs[{i}] ({run.name})", str(e)) from None
    return spec


# ---- parameter counts -------------------------------------------------------------------------

def _model_config(tree: dict):
    from longcat_megatron.config import build_section
    from longcat_megatron.model.config import ModelConfig

    return build_section(ModelConfig, tree, "model")


def counts(cfg) -> dict:
    """total, activated (summary.py's convention at the budget target), n-gram parameters."""
    from longcat_megatron.model.ngram_config import ngram_parameter_count
    from longcat_megatron.model.param_count import per_layer_embedding_parameters, total_parameters

    h, L = cfg.hidden_size, cfg.num_layers
    total = total_parameters(cfg)
    ngram = 0
    if cfg.ngram is not None:
        ngram = sum(ngram_parameter_count(cfg.ngram, cfg.vocab_size, h))
        if cfg.ngram.amplification == "layernorm":
            ngram += 2 * h
    per_expert = L * 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    k = cfg.budget_target_ffn_experts if cfg.budget_target_ffn_experts is not None else cfg.moe_router_topk
    # Lookups are not activated: the input embedding, its N-gram tables and the per-layer
    # embeddings (model.per_layer_embedding) are left out, as summary.py does.
    per_layer = sum(per_layer_embedding_parameters(cfg))
    activated = (total - cfg.vocab_size * h - ngram - per_layer - cfg.num_experts * per_expert
                 + k * per_expert)
    return {"total": int(total), "activated": int(round(activated)), "ngram": int(ngram)}


def _solve_experts(cfg, target: float, multiple: int):
    best = None
    n = max(cfg.moe_router_topk, multiple)
    n = int(math.ceil(n / multiple) * multiple)
    while True:
        c = counts(dataclasses.replace(cfg, num_experts=n))
        err = abs(c["total"] / c["activated"] - target)
        if best is not None and err > best[0]:
            return best[1]
        best = (err, n) if best is None or err < best[0] else best
        n += multiple


def _solve_ngram_ratio(cfg, target: float):
    """ngram_vocab_size_ratio (2 decimals) whose total/activated is nearest ``target``."""
    c0 = counts(dataclasses.replace(cfg, ngram=dataclasses.replace(cfg.ngram, ngram_vocab_size_ratio=1.0)))
    c1 = counts(dataclasses.replace(cfg, ngram=dataclasses.replace(cfg.ngram, ngram_vocab_size_ratio=2.0)))
    slope = c1["total"] - c0["total"]
    want = target * c0["activated"]
    ratio = max(0.01, round(1.0 + (want - c0["total"]) / slope, 2))
    # Keep the moduli off integer multiples of V (2-gram collisions spike there, P-Lite §3.2): a
    # fractional part within OFF_MULTIPLE of an integer moves to that distance (the total moves by
    # at most OFF_MULTIPLE * V * hidden_size parameters, ~1% here). Runs that want a multiple give
    # the ratio themselves (no scale).
    whole, frac = math.floor(ratio), ratio - math.floor(ratio)
    if frac < OFF_MULTIPLE and whole >= 1:
        ratio = whole + OFF_MULTIPLE
    elif frac > 1 - OFF_MULTIPLE:
        ratio = whole + 1 - OFF_MULTIPLE
    ratio = round(ratio, 2)
    return dataclasses.replace(cfg, ngram=dataclasses.replace(cfg.ngram, ngram_vocab_size_ratio=ratio))


def run_model(spec: Spec, run: RunSpec):
    """The run's ModelConfig (with the solved expert count / N-gram ratio)."""
    tree = copy.deepcopy(spec.base["model"])
    tree.update(copy.deepcopy(run.model))
    if run.ngram is not None:
        ng = {"silence": list(DEFAULT_SILENCE)}
        ng.update(copy.deepcopy(run.ngram))
        ng.setdefault("eos_token_id", (spec.base.get("data") or {}).get("eod_token_id", 2))
        tree["ngram"] = ng
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _model_config(tree)
        if run.scale == "experts":
            multiple = int((spec.base.get("parallel") or {}).get("expert", 1))
            cfg = dataclasses.replace(cfg, num_experts=_solve_experts(cfg, run.target_ratio, multiple))
        elif run.scale == "ngram":
            cfg = _solve_ngram_ratio(cfg, run.target_ratio)
        cfg = _model_config(model_tree(cfg))
        cfg.validate()   # the model's own checks (N-gram shape vs hidden size, the paper's rules)
    return cfg


def model_tree(cfg) -> dict:
    from longcat_megatron.config import to_dict

    return to_dict(cfg)


def run_config_tree(spec: Spec, run: RunSpec, run_dir: str, data_prefix: str, tokenizer: str) -> dict:
    """The full run config (YAML tree) of one run, in ``run_dir``."""
    tree = copy.deepcopy(spec.base)
    tree["model"] = model_tree(run_model(spec, run))
    data = tree.setdefault("data", {})
    data.update({"paths": [data_prefix], "tokenizer": tokenizer, "split": spec.corpus.split, "mock": False})
    ck = tree.setdefault("checkpoint", {})
    ck["save"] = os.path.join(run_dir, "checkpoints")
    ck.setdefault("save_interval", (tree.get("train") or {}).get("eval_interval", 0))
    tree.setdefault("logging", {})["tensorboard_dir"] = os.path.join(run_dir, "tensorboard")
    return tree


def fingerprint(tree: dict, overrides: list) -> str:
    blob = json.dumps({"config": tree, "overrides": list(overrides)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
