"""Print a LongCat model's parameter counts: total, by part, and the activated range per token.

    python -m longcat_megatron.model.summary --config configs/longcat_flash.yaml [model.x=y ...]
    python -m longcat_megatron.model.summary --config configs/longcat_flash_lite.yaml --vanilla --expert-multiple 16

The model is built on the meta device (no memory, no initialisation) in a single local process.
With ``model.ngram`` the input embedding is the N-gram Embedding: its hashed sub-tables and their
projections are reported as their own parts (and summed as "N-gram Embedding").
"Activated per token" counts every parameter a token touches except the input embedding (the token
embedding and, with ``model.ngram``, the whole N-gram Embedding: tables and projections; with
``model.per_layer_embedding`` the dense MLPs' per-layer tables and projections, also lookups; the
MTP head is reported separately): attention, dense MLPs, routers, norms, LM head, plus k FFN experts
per layer for k = 0 ... top-k (zero experts cost nothing). The value at the budget target K_e is
printed when configured.

``model/param_count.py``'s :func:`total_parameters` gives the same total analytically (no torch),
for config checks (it lives apart so that ``model/config.py`` needs none of the model modules).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

from longcat_megatron.model.param_count import total_parameters  # noqa: F401  (re-exported)

# Input-embedding parts (the first matching part wins, so the N-gram parts come first).
NGRAM_PARTS = ("N-gram tables", "N-gram projections")
# model.per_layer_embedding: the dense MLPs' own token tables, hashed tables and projections.
PER_LAYER_PARTS = ("per-layer token tables", "per-layer n-gram tables", "per-layer projections")
# Left out of "activated per token" (lookups, like the input embedding).
INPUT_EMBEDDING_PARTS = ("embedding",) + NGRAM_PARTS + PER_LAYER_PARTS
PARTS = OrderedDict([
    ("per-layer token tables", (".per_layer_embedding.word_embeddings.",)),
    ("per-layer n-gram tables", (".per_layer_embedding.ngram_tables",)),
    ("per-layer projections", (".per_layer_embedding.post_projs.",
                               ".per_layer_embedding.output_norm.")),
    ("N-gram tables", ("embedding.ngram_tables",)),
    ("N-gram projections", ("embedding.post_projs.", "embedding.output_norm.")),
    ("embedding", ("embedding.",)),
    ("attention (MLA)", (".self_attention_",)),
    ("dense MLPs", (".mlps_",)),
    ("FFN experts", (".mlp.experts.",)),
    ("routers", (".mlp.router.",)),
    ("norms", ("layernorm",)),
    ("LM head", ("output_layer.",)),
])


def part_of(name: str) -> str:
    """Which reported part a parameter name belongs to."""
    if name.startswith("mtp_head."):
        return "MTP head"
    for part, needles in PARTS.items():
        if any(n in name for n in needles):
            return part
    return "other"


def count_parameters(model) -> dict:
    """Parameter count per part."""
    counts: dict = OrderedDict((p, 0) for p in list(PARTS) + ["other", "MTP head"])
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    return counts


def build_on_meta(cfg):
    """The whole model (one process, no parallelism) on the meta device."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(runtime.free_port())
    runtime.initialize()
    tf = transformer_config(cfg)
    tf.perform_initialization = False
    with torch.device("meta"):
        return build_longcat_chunk(cfg, tf, pre_process=True, post_process=True)


def summarize(cfg) -> dict:
    """Counts by part plus totals and the activated range (numbers of parameters)."""
    counts = count_parameters(build_on_meta(cfg))
    per_expert_all_layers = counts["FFN experts"] // cfg.num_experts
    main = sum(v for k, v in counts.items() if k != "MTP head")
    base = main - sum(counts[p] for p in INPUT_EMBEDDING_PARTS) - counts["FFN experts"]
    out = {"parts": counts, "total": main, "mtp": counts["MTP head"],
           "ngram": sum(counts[p] for p in NGRAM_PARTS),
           "per_layer": sum(counts[p] for p in PER_LAYER_PARTS),
           "activated_min": base, "activated_max": base + cfg.moe_router_topk * per_expert_all_layers,
           "per_ffn_expert_all_layers": per_expert_all_layers}
    if cfg.budget_target_ffn_experts is not None:
        out["activated_at_target"] = base + cfg.budget_target_ffn_experts * per_expert_all_layers
    return out


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f}B"


def render(cfg, s: dict) -> str:
    lines = [f"LongCat model: {cfg.num_layers} shortcut layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_experts} FFN + {cfg.zero_expert_num} zero experts, top-{cfg.moe_router_topk}"]
    if cfg.ngram is not None:
        ng = cfg.ngram
        moduli = ng.moduli(cfg.vocab_size)
        lines.append(f"N-gram Embedding: ratio {ng.ngram_vocab_size_ratio:g}, N={ng.emb_neighbor_num}, "
                     f"K={ng.emb_split_num}: {ng.num_tables} sub-tables of {min(moduli):,}..."
                     f"{max(moduli):,} rows x {cfg.hidden_size // ng.num_tables}")
    for part, n in s["parts"].items():
        if n and part != "MTP head":
            lines.append(f"  {part:<23} {_b(n):>10}  ({n:,})")
    if s["ngram"]:
        lines.append(f"  {'N-gram Embedding':<23} {_b(s['ngram']):>10}  ({s['ngram']:,})  "
                     f"[{s['ngram'] / s['total']:.1%} of the total]")
    if s["per_layer"]:
        lines.append(f"  {'per-layer embeds':<23} {_b(s['per_layer']):>10}  ({s['per_layer']:,})  "
                     f"[{s['per_layer'] / s['total']:.1%} of the total, {cfg.per_layer_embedding}]")
    lines.append(f"  {'total':<23} {_b(s['total']):>10}  ({s['total']:,})  [MTP not included]")
    if s["mtp"]:
        lines.append(f"  {'MTP head':<23} {_b(s['mtp']):>10}  ({s['mtp']:,})")
    left_out = "the input embedding" + (" (token + whole N-gram Embedding)" if s["ngram"] else "")
    if s["per_layer"]:
        left_out += " and the per-layer embeddings"
    lines.append(f"activated per token (all but {left_out}, k FFN experts of "
                 f"{_b(s['per_ffn_expert_all_layers'])} each over all layers): "
                 f"{_b(s['activated_min'])} (k=0) - {_b(s['activated_max'])} (k={cfg.moe_router_topk})")
    if "activated_at_target" in s:
        lines.append(f"  at the budget target K_e={cfg.budget_target_ffn_experts}: "
                     f"{_b(s['activated_at_target'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longcat_megatron.model.summary",
        description="Build a LongCat model on the meta device and print its parameter counts: "
                    "total, by part, MTP head separately, and the activated range per token.")
    parser.add_argument("--config", required=True, help="run config YAML (its model: section is used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=14")
    parser.add_argument("--vanilla", action="store_true",
                        help="also print the model's vanilla twin (its N-gram parameters as more FFN experts, "
                             "same total: the Lite paper's control; model/vanilla.py) and compare the two")
    parser.add_argument("--expert-multiple", type=int, default=1,
                        help="with --vanilla: keep the twin's expert count a multiple of this (the EP size)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from longcat_megatron.config import ConfigError, load_config

    try:
        # Only the model section matters here: data.mock stops the data checks (paths) from
        # rejecting a cluster config on a machine that has no corpus.
        cfg = load_config(args.config, list(args.overrides) + ["data.mock=true"]).model
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.arch != "longcat":
        print(f"error: {args.config}: model.arch is {cfg.arch!r}; this summary is for arch: longcat",
              file=sys.stderr)
        return 2
    from longcat_megatron import runtime

    try:
        twin = None
        if args.vanilla:
            from longcat_megatron.model.vanilla import vanilla_twin

            twin = vanilla_twin(cfg, args.expert_multiple)
        s = summarize(cfg)
        print(render(cfg, s))
        if twin is not None:
            print("\nvanilla twin (the N-gram Embedding's parameters as FFN experts):")
            t = summarize(twin)
            print(render(twin, t))
            print("\n" + compare(cfg, s, twin, t))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        runtime.shutdown()
    return 0


def compare(cfg, s: dict, twin, t: dict) -> str:
    """Model vs vanilla twin: experts, totals, N-gram share, activated range."""
    def delta(a, b):
        return f"{b / a - 1:+.2%}"

    rows = [("FFN experts", f"{cfg.num_experts}", f"{twin.num_experts}", f"+{twin.num_experts - cfg.num_experts}"),
            ("total", _b(s["total"]), _b(t["total"]), delta(s["total"], t["total"])),
            ("N-gram share", f"{s['ngram'] / s['total']:.1%}", f"{t['ngram'] / t['total']:.1%}", ""),
            ("activated (k=0)", _b(s["activated_min"]), _b(t["activated_min"]),
             delta(s["activated_min"], t["activated_min"])),
            (f"activated (k={cfg.moe_router_topk})", _b(s["activated_max"]), _b(t["activated_max"]),
             delta(s["activated_max"], t["activated_max"]))]
    if "activated_at_target" in s:
        rows.append((f"activated (K_e={cfg.budget_target_ffn_experts:g})", _b(s["activated_at_target"]),
                     _b(t["activated_at_target"]), delta(s["activated_at_target"], t["activated_at_target"])))
    lines = [f"{'':<22} {'model':>12} {'vanilla twin':>13} {'change':>8}"]
    lines += [f"{name:<22} {a:>12} {b:>13} {d:>8}" for name, a, b, d in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
