"""Recipe files: stage overlays and which recipe values are published and which are guessed.

A model config (``configs/longcat_flash.yaml``, ``configs/longcat_flash_lite.yaml``) holds the
architecture and the first stage's settings; a *stage file* (``configs/stages/*.yaml``) holds only
what a stage changes (sequence length, RoPE, token budget, batch ...). ``train --stage FILE``
applies the stage file's values as overrides after the config and before the command line.

Labels are comments on the value's line (or on comment lines right above it):

* ``# guess: REASON`` -- not published; REASON says where the value comes from;
* ``# cluster: REASON`` -- a choice for the cluster (parallel layout, save interval), not a recipe value;
* anything else is a published value (its source in an ordinary comment).

A stage file's ``recipe:`` section is not a config section: it holds the stage's
``token_budget`` (``11T``, ``80B``, ``1.5e12``) and ``wsd_decay_fraction``, from which
``python -m longcat_megatron.recipe iterations --config C --stage S [overrides]`` computes
``train.train_iters`` (honouring ``train.batch_schedule``) and ``schedule.wsd_decay_iters`` for the
stage scripts.

``--dry-run`` prints the three lists (:func:`print_labels`), plus the values the command line or
the stage script set, which override the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import yaml

from longcat_megatron.errors import UserInputError

RECIPE_SECTION = "recipe"
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*)\s*:(?P<rest>.*)$")
_LABEL = re.compile(r"#\s*(?P<kind>guess|cluster)\s*:\s*(?P<why>.*)$")


@dataclass
class Labelled:
    key: str  # dotted, e.g. optimizer.lr
    value: str  # as written in the file
    kind: str  # "published" | "guess" | "cluster"
    why: str
    source: str  # file


def stage_overrides(path: str) -> list[str]:
    """``section.field=value`` overrides from a stage file (nested YAML, values as YAML flow)."""
    try:
        tree = yaml.safe_load(open(path)) or {}
    except OSError:
        raise UserInputError(f"stage file '{path}' does not exist (see configs/stages/)") from None
    except yaml.YAMLError as e:
        raise UserInputError(f"stage file '{path}' is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserInputError(f"stage file '{path}' must hold a mapping of sections")
    out: list[str] = []
    tree = {k: v for k, v in tree.items() if k != RECIPE_SECTION}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                walk(v, key)
            else:
                text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
                out.append(f"{key}={text.removesuffix('...').strip()}")
    walk(tree, "")
    return out


def labelled_values(path: str) -> list[Labelled]:
    """Every leaf value of a YAML recipe file with its label (see the module docstring)."""
    stack: list[tuple[int, str]] = []
    pending: Optional[tuple[str, str]] = None
    out: list[Labelled] = []
    for raw in open(path):
        line = raw.rstrip("\n")
        stripped = line.strip()
        if not stripped:
            pending = None
            continue
        if stripped.startswith("#"):
            m = _LABEL.search(stripped)
            if m:
                pending = (m["kind"], m["why"].strip())
            elif pending is not None:
                pending = (pending[0], pending[1] + " " + stripped.lstrip("# ").strip())
            continue
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        rest = m["rest"]
        value, _, comment = rest.partition(" #")
        value = value.strip()
        label = _LABEL.search("#" + comment) if comment else None
        kind, why = (label["kind"], label["why"].strip()) if label else (pending or ("published", ""))
        if not label and not pending and comment:
            why = comment.strip()
        pending = None
        key = ".".join([k for _, k in stack] + [m["key"]])
        if value == "":
            stack.append((indent, m["key"]))
            continue
        out.append(Labelled(key, value, kind, why, path))
    return out


def print_labels(paths: Sequence[str], overrides: Sequence[str] = (), stream=None) -> dict:
    """Print published / guessed / cluster values of ``paths`` (later files win) and the command-line
    overrides; returns ``{kind: [keys]}``."""
    import sys

    stream = stream or sys.stdout
    merged: dict[str, Labelled] = {}
    for path in paths:
        for item in labelled_values(path):
            merged[item.key] = item
    overridden = {}
    for text in overrides:
        key, _, value = text.partition("=")
        overridden[key.strip()] = value
    groups: dict = {"published": [], "guess": [], "cluster": []}
    for item in merged.values():
        groups[item.kind].append(item)
    titles = {"published": "published values (source in the config comments)",
              "guess": "GUESSED values (not published; reason)",
              "cluster": "cluster choices (not recipe values)"}
    print("recipe values (" + ", ".join(paths) + "):", file=stream)
    for kind in ("published", "guess", "cluster"):
        print(f"  {titles[kind]}: {len(groups[kind])}", file=stream)
        for item in groups[kind]:
            note = f"  # {item.why}" if item.why and kind != "published" else ""
            over = f"  [overridden: {overridden[item.key]}]" if item.key in overridden else ""
            print(f"    {item.key} = {item.value}{over}{note}", file=stream)
    extra = [k for k in overridden if k not in merged]
    if extra:
        print("  set by the stage script / command line (not in the files): "
              + ", ".join(f"{k}={overridden[k]}" for k in extra), file=stream)
    return {k: [i.key for i in v] for k, v in groups.items()}


def stage_recipe(path: str) -> dict:
    """The ``recipe:`` section of a stage file (token_budget, wsd_decay_fraction)."""
    tree = yaml.safe_load(open(path)) or {}
    section = tree.get(RECIPE_SECTION) or {}
    unknown = set(section) - {"token_budget", "wsd_decay_fraction"}
    if unknown:
        raise UserInputError(f"{path}: unknown recipe field(s) {sorted(unknown)}; allowed: token_budget, "
                             "wsd_decay_fraction")
    return section


def stage_iterations(config: str, stage: Optional[str], overrides: Sequence[str] = (),
                     token_budget=None, wsd_decay_fraction=None,
                     train_iters: Optional[int] = None) -> tuple[int, int, int]:
    """(train_iters, wsd_decay_iters, budget tokens) of a stage: the token budget (argument, else the
    stage file's) over the resolved sequence length, batch and batch schedule; with ``train_iters``
    given, those iterations (budget 0) with the stage's decay fraction."""
    from longcat_megatron.config import load_config
    from longcat_megatron.training.batch_schedule import iterations_for_tokens, parse_tokens

    section = stage_recipe(stage) if stage else {}
    fraction = float(wsd_decay_fraction if wsd_decay_fraction not in (None, "")
                     else section.get("wsd_decay_fraction", 0.1))
    if train_iters:
        return train_iters, max(1, int(train_iters * fraction)), 0
    budget = token_budget if token_budget not in (None, "") else section.get("token_budget")
    if budget in (None, ""):
        raise UserInputError("no token budget: set TOKEN_BUDGET (e.g. 11T) or recipe.token_budget in the "
                             "stage file")
    # (data.mock: no corpus needed; wsd_decay_iters is what this computes, any positive value validates)
    cfg = load_config(config, (stage_overrides(stage) if stage else []) + list(overrides)
                      + ["data.mock=true", "schedule.wsd_decay_iters=1"])
    t = cfg.train
    iters = iterations_for_tokens(budget, t.global_batch_size, t.batch_schedule, cfg.data.seq_length)
    return iters, max(1, int(iters * fraction)), parse_tokens(budget, "token budget")


def main(argv=None) -> int:
    """``python -m longcat_megatron.recipe iterations --config C [--stage S] [--tokens 11T]
    [--wsd-decay-fraction F] [--iters N] [overrides]`` prints ``TRAIN_ITERS WSD_DECAY_ITERS
    BUDGET_TOKENS`` (budget 0 with ``--iters``)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m longcat_megatron.recipe")
    p.add_argument("command", choices=["iterations"])
    p.add_argument("--config", required=True)
    p.add_argument("--stage", default=None)
    p.add_argument("--tokens", default=None, help="token budget (11T, 80B, 1.5e12); default: the stage file's")
    p.add_argument("--wsd-decay-fraction", default=None)
    p.add_argument("--iters", type=int, default=None,
                   help="explicit iterations (no token budget): prints them with the stage's decay")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    try:
        iters, decay, budget = stage_iterations(args.config, args.stage, args.overrides, args.tokens,
                                                args.wsd_decay_fraction, args.iters)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(iters, decay, budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def describe_batch_schedule(cfg) -> Optional[str]:
    """One line for ``--dry-run`` when ``train.batch_schedule`` is set: the batches, their token
    thresholds and the tokens the configured iterations cover (None without a schedule)."""
    from longcat_megatron.training.batch_schedule import parse, samples_for_iterations

    t, seq = cfg.train, cfg.data.seq_length
    if not t.batch_schedule:
        return None
    steps = ", ".join(f"{b} from {tok / 1e9:,.0f}B tokens" for tok, b in parse(t.batch_schedule))
    tokens = samples_for_iterations(t.train_iters, t.global_batch_size, t.batch_schedule, seq) * seq
    return (f"  batch schedule: {t.global_batch_size}, then {steps}; {t.train_iters:,} iterations = "
            f"{tokens / 1e9:,.3f}B tokens (the tokens/step figure above is the first batch's)")
