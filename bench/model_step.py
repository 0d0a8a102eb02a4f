"""Step time of the tiny LongCat model vs. megatron-core's plain GPT with the same activated
parameters per token, same machine, same process, interleaved steps.

    OMP_NUM_THREADS=1 python bench/model_step.py [--config configs/tiny_longcat.yaml] [--steps 20]

The GPT baseline has 2 x num_layers layers (a shortcut layer holds two attention+MLP blocks), the
same hidden size and heads, and a dense MLP width chosen so that its parameters per token (all but the
input embedding) equal the LongCat model's at the budget target K_e (or top-k if no target).
One step = forward + backward + Adam on one micro-batch (fp32, one process). Prints both median step
times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _activated(model, cfg, k: float) -> float:
    """Parameters a token touches (all but the input embedding), k FFN experts per layer."""
    from longcat_megatron.model.summary import count_parameters

    c = count_parameters(model)
    experts = c["FFN experts"] / cfg.num_experts
    return sum(v for p, v in c.items() if p not in ("embedding", "FFN experts", "MTP head")) + k * experts


def _gpt_config(cfg, target: float):
    """A dense GPT ModelConfig with 2L layers whose non-embedding parameters equal ``target``."""
    import dataclasses

    h, layers = cfg.hidden_size, 2 * cfg.num_layers
    fixed = layers * (4 * h * h + 2 * h) + h + h * cfg.vocab_size   # attention, norms, final norm, head
    ffn = max(8, round((target - fixed) / (layers * 3 * h)))
    return dataclasses.replace(cfg, arch="gpt", num_layers=layers, ffn_hidden_size=ffn,
                               num_experts=None, mtp_num_layers=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_longcat.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from longcat_megatron import runtime

    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    from longcat_megatron.config import load_config
    from longcat_megatron.model.factory import build_model_chunk, transformer_config

    run = load_config(args.config, ["data.mock=true"])
    cfg, seq = run.model, run.data.seq_length
    runtime.initialize(seed=run.train.seed)
    longcat = build_model_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    k = cfg.budget_target_ffn_experts or cfg.moe_router_topk
    target = _activated(longcat, cfg, k)
    gcfg = _gpt_config(cfg, target)
    gpt = build_model_chunk(gcfg, transformer_config(gcfg), pre_process=True, post_process=True)
    gpt_active = sum(p.numel() for n, p in gpt.named_parameters() if "embedding" not in n)

    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq)[None].expand(args.batch, -1)
    models = {"longcat": longcat, "gpt": gpt}
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-4) for n, m in models.items()}
    times: dict = {n: [] for n in models}
    for step in range(args.steps + 2):
        for name, model in models.items():
            t0 = time.perf_counter()
            opts[name].zero_grad()
            model(tokens, pos, None, labels=labels).mean().backward()
            opts[name].step()
            if hasattr(model, "on_train_step_end"):
                model.on_train_step_end(step)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    lc, gp = statistics.median(times["longcat"]), statistics.median(times["gpt"])
    table = "\n".join([
        f"Command: `python bench/model_step.py --config {args.config} --steps {args.steps} "
        f"--batch {args.batch}`; one process, fp32, batch {args.batch} x seq {seq}, forward + "
        f"backward + Adam, median of {args.steps} interleaved steps.",
        "",
        "| model | activated params/token | step ms |",
        "|---|---|---|",
        f"| tiny LongCat (k={k} FFN experts) | {target / 1e6:.3f}M | {lc * 1e3:.1f} |",
        f"| megatron GPT ({gcfg.num_layers} layers, ffn {gcfg.ffn_hidden_size}) | "
        f"{gpt_active / 1e6:.3f}M | {gp * 1e3:.1f} |",
        "",
        f"Ratio LongCat / GPT: **{lc / gp:.2f}**",
    ])
    print(table)
    if not args.no_write:
        from bench.report import append_section

        print("appended to", append_section("Model step: tiny LongCat vs megatron GPT", table))
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
