"""Write the narrow proxy of a run config for hyperparameter transfer by width scaling.

    python -m longcat_megatron.proxy --config configs/longcat_flash.yaml --width-scale 8 \\
        --out runs/proxy.yaml [--attention heads|head-dim] [section.field=value ...]

Every *width* of the model is divided by S: ``hidden_size``, the dense and expert FFN widths
(``ffn_hidden_size``, ``moe_ffn_hidden_size``), the MLA ranks (``q_lora_rank``, ``kv_lora_rank``:
the q/kv scale correction ``sqrt(H / rank)`` stays the same), and either the number of attention
heads (``--attention heads``, the default: head widths and so the softmax temperature 1/sqrt(d) are
kept) or the head widths (``--attention head-dim``: LongCat's ``qk_nope/qk_rope/v_head_dim``; GPT's
hidden/heads). Everything else is kept: depth, FFN/zero expert counts, top-k, vocabulary, the N-gram
layout (its sub-table width is H / tables, so it shrinks with H), the training settings.
A width that S does not divide is refused with the field named. The overrides apply to CONFIG
before scaling (as ``train`` applies them), e.g. ``parallel.tensor=1 data.paths=[...]``.

The proxy's ``transfer.base_hidden_size`` is its own hidden size (s = 1): tune ``optimizer.lr`` (and
``model.init_method_std``) on it, then train CONFIG with those values and
``transfer.base_hidden_size=<proxy hidden>`` (longcat_megatron/transfer.py applies the rules).
The output is the proxy's full resolved config, headed by comments saying what was scaled and what
was kept. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

import yaml

from longcat_megatron.errors import UserInputError

# Model fields that are widths: divided by S in every proxy (None fields are skipped).
WIDTH_FIELDS = ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size")
MLA_RANK_FIELDS = ("q_lora_rank", "kv_lora_rank")
MLA_HEAD_DIM_FIELDS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# Model fields that are shown as kept (the shape parts a reader might expect to change).
KEPT_FIELDS = ("num_layers", "num_experts", "moe_router_topk", "vocab_size", "init_method_std")
KEPT_LONGCAT_FIELDS = ("zero_expert_num", "mtp_num_layers")
ATTENTION_MODES = ("heads", "head-dim")


class ProxyError(UserInputError):
    """The config cannot be narrowed by the requested scale; the message names the field."""


def _divide(model, name: str, s: int) -> int:
    value = getattr(model, name)
    if value % s:
        raise ProxyError(f"model.{name}={value} is not divisible by --width-scale {s}: pick a scale "
                         "that divides it")
    return value // s


def scale_fields(model, s: int, attention: str = "heads") -> dict:
    """``{model field: proxy value}`` for every width the proxy divides by ``s``."""
    if attention not in ATTENTION_MODES:
        raise ProxyError(f"--attention {attention!r}: use {' or '.join(ATTENTION_MODES)}")
    names = [n for n in WIDTH_FIELDS if getattr(model, n) is not None]
    if model.arch == "longcat":
        names += list(MLA_RANK_FIELDS)
    if attention == "heads":
        names.append("num_attention_heads")
    elif model.arch == "longcat":
        names += list(MLA_HEAD_DIM_FIELDS)
    out = {n: _divide(model, n, s) for n in names}
    if model.arch == "longcat" and out.get("qk_rope_head_dim", 2) % 2:
        raise ProxyError(f"model.qk_rope_head_dim={model.qk_rope_head_dim} / {s} is odd (RoPE needs "
                         "pairs): use --attention heads or another scale")
    if model.ngram is not None and out["hidden_size"] % model.ngram.num_tables:
        raise ProxyError(
            f"the proxy's hidden size {out['hidden_size']} is not divisible by the "
            f"{model.ngram.num_tables} N-gram sub-tables (model.ngram keeps its layout): pick a "
            "scale that leaves a multiple of the table count")
    if attention == "head-dim" and model.arch == "gpt" and out["hidden_size"] % model.num_attention_heads:
        raise ProxyError(f"the proxy's hidden size {out['hidden_size']} is not divisible by "
                         f"model.num_attention_heads={model.num_attention_heads}")
    return out


def make_proxy(cfg, s: int, attention: str = "heads"):
    """(proxy RunConfig, scaled ``{field: (old, new)}``): ``cfg`` with its widths divided by ``s``
    and ``transfer.base_hidden_size`` = the proxy's hidden size. Raises :class:`ProxyError`."""
    if s < 1:
        raise ProxyError(f"--width-scale {s} must be an integer >= 1")
    t = cfg.transfer
    fields = scale_fields(cfg.model, s, attention)
    hidden = fields["hidden_size"]
    if t.base_hidden_size is not None and t.base_hidden_size != hidden:
        raise ProxyError(
            f"transfer.base_hidden_size={t.base_hidden_size} in the config, but the proxy at "
            f"--width-scale {s} is {hidden} wide: use --width-scale "
            f"{cfg.model.hidden_size / t.base_hidden_size:g}, or change transfer.base_hidden_size")
    from longcat_megatron.transfer import TransferConfig

    model = dataclasses.replace(cfg.model, **fields)
    proxy = dataclasses.replace(cfg, model=model, transfer=TransferConfig(base_hidden_size=hidden))
    return proxy, {n: (getattr(cfg.model, n), v) for n, v in fields.items()}


def check_proxy(proxy) -> None:
    """The run-config checks (model shape vs. parallel layout ...) on the proxy; its data are
    checked when it is trained or dry-run."""
    from longcat_megatron.config import ConfigError, validate

    try:
        validate(dataclasses.replace(proxy, data=dataclasses.replace(proxy.data, mock=True)))
    except UserInputError as e:
        raise ConfigError(f"the proxy: {e} (the proxy keeps the config's other sections; give "
                          "overrides for it, e.g. parallel.tensor=1 parallel.expert=1)") from None


def header(config: str, s: int, scaled: dict, proxy) -> str:
    """The comment block on top of the proxy YAML: what was scaled, what was kept, what next."""
    m = proxy.model
    names = KEPT_FIELDS + (KEPT_LONGCAT_FIELDS if m.arch == "longcat" else ())
    kept = [f"{n}={getattr(m, n)}" for n in names if getattr(m, n) is not None]
    if "num_attention_heads" not in scaled:
        kept.append(f"num_attention_heads={m.num_attention_heads} (head widths divided)")
    if m.ngram is not None:
        kept.append(f"ngram layout (N={m.ngram.emb_neighbor_num}, K={m.ngram.emb_split_num}, "
                    f"ratio {m.ngram.ngram_vocab_size_ratio:g}; table width {m.hidden_size // m.ngram.num_tables})")
    lines = [f"Proxy of {config} at width scale 1/{s} (python -m longcat_megatron.proxy).",
             "Scaled: " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in scaled.items()) + ".",
             "Kept: " + ", ".join(kept) + "; all other sections as in the config.",
             f"Tune optimizer.lr / model.init_method_std here, then train {config} with them and",
             f"transfer.base_hidden_size={m.hidden_size} (width scale {s}).",
             "Data are not checked here: dry-run or train the proxy with its data.paths."]
    return "".join(f"# {line}\n" for line in lines)


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def render_yaml(tree: dict, comments: dict, prefix: str = "", indent: int = 0) -> str:
    """``tree`` as block YAML, leaf values in flow style, ``comments[dotted key]`` after a value
    (so the ``# guess:`` / ``# cluster:`` labels of the config survive into the proxy)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.append(f"{' ' * indent}{key}:\n" + render_yaml(value, comments, dotted, indent + 2))
            continue
        note = comments.get(dotted)
        out.append(f"{' ' * indent}{key}: {_flow(value)}" + (f"  # {note}" if note else "") + "\n")
    return "".join(out)


def value_comments(config: str, s: int, scaled: dict) -> dict:
    """The config's labels by dotted key, and ``proxy: OLD / S`` on the scaled fields."""
    from longcat_megatron.recipe import labelled_values

    notes = {item.key: (f"{item.kind}: {item.why}" if item.kind != "published" else item.why)
             for item in labelled_values(config)}
    notes.update({f"model.{n}": f"proxy: {a} / {s}" for n, (a, _) in scaled.items()})
    notes["transfer.base_hidden_size"] = "proxy: its own width (s = 1)"
    return {k: v for k, v in notes.items() if v}


def write_proxy(path: str, text: str) -> None:
    """``text`` at ``path``, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_megatron.proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the target run config (YAML)")
    p.add_argument("--width-scale", type=int, required=True, metavar="S",
                   help="divide every width by S (an integer that divides them)")
    p.add_argument("--out", required=True, help="where to write the proxy's YAML")
    p.add_argument("--attention", default="heads", choices=ATTENTION_MODES,
                   help="divide the head count (default; head widths kept) or the head widths")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied to CONFIG before scaling")
    args = p.parse_args(argv)
    from longcat_megatron.config import load_config, to_dict

    try:
        # Field checks only: the target's data and layout need not suit this machine.
        cfg = load_config(args.config, list(args.overrides), check=False)
        proxy, scaled = make_proxy(cfg, args.width_scale, args.attention)
        check_proxy(proxy)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = header(args.config, args.width_scale, scaled, proxy)
    body = render_yaml(to_dict(proxy), value_comments(args.config, args.width_scale, scaled))
    write_proxy(args.out, text + body)
    print(text + f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
