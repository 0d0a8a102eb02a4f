"""Transfer bench: does the best learning rate found at a narrow width carry over to a wide one?

    OMP_NUM_THREADS=1 python bench/lr_transfer.py [--widths 64 256] [--iters 80] [--write]

An LR sweep of the tiny LongCat model (2 shortcut layers, MLA with the q/kv scale correction, 8 FFN
+ 4 zero experts top-4; heads, MLA ranks and FFN widths proportional to the width, head widths
fixed, i.e. what ``longcat_megatron.proxy`` keeps and divides) on the project's tiny corpus
(``data_tools.tiny_corpus``: Python's help texts and stdlib sources, byte-level BPE 2048),
at two widths, with ``transfer.base_hidden_size`` = the narrow width ("on") and without it ("off",
one LR and init std for every parameter). Each run trains ``--iters`` steps (warmup 10, cosine to
LR/10) through the real training loop (one gloo process) and is scored by its validation loss on
held-out documents. The narrow width is the same run on and off (s = 1). Prints the table;
``--write`` appends it, with the plot (docs/lr_transfer.png), to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import ROOT, append_section  # noqa: E402

LRS = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
PLOT = os.path.join(ROOT, "docs", "lr_transfer.png")


def corpus(work: str) -> tuple[str, str]:
    """(indexed-dataset prefix, tokenizer dir) of the tiny corpus under ``work`` (built once)."""
    from data_tools.preprocess import preprocess
    from data_tools.tiny_corpus import build_tiny_corpus

    tiny = os.path.join(work, "tiny")
    build_tiny_corpus(tiny, vocab_size=2048, max_mb=3.0)
    prefix, tok = os.path.join(work, "corpus"), os.path.join(tiny, "tokenizer")
    if not os.path.isfile(prefix + ".idx"):
        preprocess([os.path.join(tiny, "corpus.jsonl")], tok, prefix, workers=0, progress=False)
    return prefix, tok


def overrides(width: int, base: int, transfer: bool, lr: float, iters: int, prefix: str, tok: str) -> list:
    """Config overrides on configs/tiny_longcat.yaml for one run of the sweep."""
    return [
        f"model.hidden_size={width}", f"model.num_attention_heads={width // 16}",
        f"model.ffn_hidden_size={2 * width}", f"model.moe_ffn_hidden_size={width // 2}",
        f"model.q_lora_rank={width // 2}", f"model.kv_lora_rank={width // 4}",
        "model.vocab_size=2048", "model.mtp_num_layers=0", "model.init_method_std=0.02",
        "parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.backend=gloo",
        "data.mock=false", f"data.paths=[{prefix}]", f"data.tokenizer={tok}", "data.seq_length=128",
        "data.split=95,5,0", "train.micro_batch_size=8", "train.global_batch_size=8",
        f"train.train_iters={iters}", f"train.eval_interval={iters}", "train.eval_iters=8",
        f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}", "optimizer.weight_decay=0.0",
        "schedule.warmup_iters=10", "logging.log_interval=1000",
        f"transfer.base_hidden_size={base if transfer else 'null'}",
    ]


def sweep(widths: tuple, lrs: tuple, iters: int, work: str) -> dict:
    """``{(mode, width, lr): validation loss}`` (inf for a diverged run)."""
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    prefix, tok = corpus(work)
    layout = runtime.initialize(num_experts=8, seed=1234, backend="gloo")
    base, out = widths[0], {}
    for width in widths:
        for mode in (("on",) if width == base else ("on", "off")):
            for lr in lrs:
                t0 = time.time()
                cfg = load_config(os.path.join(ROOT, "configs", "tiny_longcat.yaml"),
                                  overrides(width, base, mode == "on", lr, iters, prefix, tok))
                result = train(cfg, layout)
                val = result.valid_losses.get(iters, float("nan"))
                out[(mode, width, lr)] = val if math.isfinite(val) else math.inf
                print(f"width {width:4d} transfer {mode:3s} lr {lr:.1e}: valid loss {val:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    for lr in lrs:
        out[("off", base, lr)] = out[("on", base, lr)]
    runtime.shutdown()
    return out


def table(results: dict, widths: tuple, lrs: tuple) -> str:
    """Markdown: validation loss per LR, one column per (width, mode); the best of each marked."""
    cols = [(w, m) for w in widths for m in (("on",) if w == widths[0] else ("on", "off"))]
    best = {c: min(lrs, key=lambda lr: results[(c[1], c[0], lr)]) for c in cols}
    head = "| optimizer.lr | " + " | ".join(
        f"width {w}" + ("" if w == widths[0] else f", transfer {m}") for w, m in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    for lr in lrs:
        cells = []
        for c in cols:
            v = results[(c[1], c[0], lr)]
            text = "diverged" if math.isinf(v) else f"{v:.3f}"
            cells.append(f"**{text}**" if lr == best[c] else text)
        rows.append(f"| {lr:.1e} | " + " | ".join(cells) + " |")
    rows.append("| best LR | " + " | ".join(f"{best[c]:.1e}" for c in cols) + " |")
    return "\n".join(rows)


def plot(results: dict, widths: tuple, lrs: tuple, path: str = PLOT) -> str:
    """Validation loss vs LR (log x), transfer on | off, one line per width."""
    from longcat_megatron.plotting import Panel, plot_panels

    panels = []
    for mode in ("on", "off"):
        series = {}
        for w in widths:
            pts = [(lr, results[(mode, w, lr)]) for lr in lrs if math.isfinite(results[(mode, w, lr)])]
            series[f"width {w}"] = ([x for x, _ in pts], [y for _, y in pts])
        panels.append(Panel(title=f"transfer {mode}", ylabel="validation loss (nats/token)",
                            series=series, xlabel="optimizer.lr", logx=True, logy=False))
    plot_panels(path, panels, title="LR sweep at two widths (tiny LongCat, tiny corpus)")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs=2, default=(64, 256))
    p.add_argument("--lrs", type=float, nargs="+", default=LRS)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_lr_transfer"))
    p.add_argument("--write", action="store_true", help="append to docs/benchmarks.md with the plot")
    args = p.parse_args(argv)
    widths, lrs = tuple(args.widths), tuple(args.lrs)
    t0 = time.time()
    results = sweep(widths, lrs, args.iters, args.work)
    md = table(results, widths, lrs)
    print(md)
    print(f"({time.time() - t0:.0f} s)")
    if args.write:
        plot(results, widths, lrs)
        cmd = (f"OMP_NUM_THREADS=1 python bench/lr_transfer.py --widths {widths[0]} {widths[1]} "
               f"--iters {args.iters} --write")
        append_section("Hyperparameter transfer: LR sweep at two widths",
                       f"Command: `{cmd}` ({time.time() - t0:.0f} s).\n\n{md}\n\n"
                       "![LR sweep](lr_transfer.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
