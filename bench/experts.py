"""Grouped vs sequential local experts: forward + backward time of one MoE layer's experts at 8, 64
and 256 local experts, same tokens, same weights, interleaved repetitions.

    OMP_NUM_THREADS=1 python bench/experts.py [--experts 8 64 256] [--tokens 4096] [--hidden 256]
                                              [--ffn 128] [--reps 10] [--bf16] [--plot PNG]

``tokens`` routed picks are spread over the experts by a fixed random routing (some experts may get
none, as in training). Prints the median times and their ratio; appends the table to
docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(module, x, counts, probs, reps: int) -> list:
    import torch

    times = []
    g = torch.randn(x.shape, dtype=x.dtype)
    for _ in range(reps):
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out, _ = module(xi, counts, probs)
        out.backward(g)
        times.append(time.perf_counter() - t0)
        module.zero_grad(set_to_none=True)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tokens", type=int, default=4096, help="routed (token, expert) picks")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128, help="expert width (moe_ffn_hidden_size)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--plot", help="also draw the times vs local experts (PNG)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from longcat_megatron import runtime

    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.experts import experts_spec
    from longcat_megatron.model.factory import transformer_config

    runtime.initialize(seed=1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows, points = [], []
    for n in args.experts:
        cfg = ModelConfig(arch="longcat", hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                          num_experts=n, moe_ffn_hidden_size=args.ffn, moe_router_topk=2)
        tf = transformer_config(cfg, bf16=args.bf16)
        pg = ProcessGroupCollection.use_mpu_process_groups()
        seq = build_module(experts_spec("sequential", n), n, tf, pg_collection=pg)
        grp = build_module(experts_spec("grouped", n), n, tf, pg_collection=pg)
        grp.load_state_dict(seq.state_dict())
        gen = torch.Generator().manual_seed(n)
        counts = torch.bincount(torch.randint(0, n, (args.tokens,), generator=gen), minlength=n)
        x = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
        probs = torch.rand(args.tokens, generator=gen)
        times = {"sequential": [], "grouped": []}
        for _ in range(2):   # warm-up, then measure; interleaved so both see the same load
            _time(seq, x, counts, probs, 1)
            _time(grp, x, counts, probs, 1)
        for _ in range(args.reps):
            times["sequential"] += _time(seq, x, counts, probs, 1)
            times["grouped"] += _time(grp, x, counts, probs, 1)
        s, g = statistics.median(times["sequential"]), statistics.median(times["grouped"])
        empty = int((counts == 0).sum())
        rows.append(f"| {n} | {empty} | {s * 1e3:.2f} | {g * 1e3:.2f} | {s / g:.2f} |")
        points.append((n, s * 1e3, g * 1e3))
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Command: `python bench/experts.py --experts {' '.join(map(str, args.experts))} "
        f"--tokens {args.tokens} --hidden {args.hidden} --ffn {args.ffn} --reps {args.reps}"
        f"{' --bf16' if args.bf16 else ''}`; one process, {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.tokens} routed tokens, hidden {args.hidden}, expert width {args.ffn}, forward + "
        f"backward of the local experts of one MoE layer, median of {args.reps}.",
        "",
        "| local experts | experts with 0 tokens | sequential ms | grouped ms | speed-up |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.plot:
        from longcat_megatron.plotting import Panel, plot_panels

        ns = [p[0] for p in points]
        plot_panels(args.plot, [
            Panel(f"Local experts fwd + bwd, {args.tokens} routed tokens", "median ms per step",
                  {"sequential (megatron SequentialMLP)": (ns, [p[1] for p in points]),
                   "grouped": (ns, [p[2] for p in points])},
                  xlabel="local experts per rank", logx=True, logy=True),
            Panel("Speed-up of grouped experts", "sequential / grouped (x)",
                  {"speed-up": (ns, [p[1] / p[2] for p in points])}, xlabel="local experts per rank",
                  logx=True, ymin=0.0, reference=[(1.0, "equal")])])
        print("plot:", args.plot)
    if not args.no_write:
        from bench.report import append_section

        print("appended to", append_section("Experts: grouped vs sequential", table))
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
