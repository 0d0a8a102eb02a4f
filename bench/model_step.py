"""Step time of the tiny LongCat model vs. megatron-core's plain GPT with the same activated
parameters per token, same machine, same process, interleaved steps.

    OMP_NUM_THREADS=1 python bench/model_step.py [--config configs/tiny_longcat.yaml] [--steps 20]
    OMP_NUM_THREADS=1 python bench/model_step.py --size h256     # a named size (SIZES below)

The GPT baseline has 2 x num_layers layers (a shortcut layer holds two attention+MLP blocks), the
same hidden size and heads, and a dense MLP width chosen so that its parameters per token (all but the
input embedding) equal the LongCat model's at the budget target K_e (or top-k if no target).
One step = forward + backward + Adam on one micro-batch (fp32, one process). LongCat runs twice, with
grouped experts (``model.expert_impl=grouped``, the default) and with megatron's SequentialMLP.
Prints the median step times and the ratios to GPT.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Named sizes: overrides on configs/tiny_longcat.yaml. h256: hidden 256, 4 shortcut layers, seq 256,
# 16 FFN + 8 zero experts (the ratio of LongCat-Flash's 512 + 256), top-6 with budget target 4,
# dense width 2H and expert width H/2 as in the tiny config, MLA heads 8 x (32 + 16); no MTP head
# (it is not among the activated parameters the GPT baseline is sized to, so it would be extra work
# on the LongCat side only).
SIZES = {
    "tiny": [],
    "h256": ["model.hidden_size=256", "model.num_layers=4", "model.num_attention_heads=8",
             "model.ffn_hidden_size=512", "model.moe_ffn_hidden_size=128", "model.num_experts=16",
             "model.zero_expert_num=8", "model.moe_router_topk=6",
             "model.budget_target_ffn_experts=4.0", "model.q_lora_rank=128",
             "model.kv_lora_rank=64", "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16",
             "model.v_head_dim=32", "model.mtp_num_layers=0", "data.seq_length=256"],
}


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
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="named size: overrides applied to --config")
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

    import dataclasses

    run = load_config(args.config, ["data.mock=true", *SIZES[args.size]])
    cfg, seq = run.model, run.data.seq_length
    runtime.initialize(seed=run.train.seed)
    longcat = build_model_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    scfg = dataclasses.replace(cfg, expert_impl="sequential")
    longcat_seq = build_model_chunk(scfg, transformer_config(scfg), pre_process=True,
                                    post_process=True)
    longcat_seq.load_state_dict(longcat.state_dict())
    k = cfg.budget_target_ffn_experts or cfg.moe_router_topk
    target = _activated(longcat, cfg, k)
    gcfg = _gpt_config(cfg, target)
    gpt = build_model_chunk(gcfg, transformer_config(gcfg), pre_process=True, post_process=True)
    gpt_active = sum(p.numel() for n, p in gpt.named_parameters() if "embedding" not in n)

    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq)[None].expand(args.batch, -1)
    models = {"longcat": longcat, "longcat_seq": longcat_seq, "gpt": gpt}
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
    lc, ls, gp = (statistics.median(times[n]) for n in ("longcat", "longcat_seq", "gpt"))
    name = f"{args.size} LongCat (H{cfg.hidden_size}, {cfg.num_layers} layers, " \
           f"{cfg.num_experts}+{cfg.zero_expert_num} experts, k={k} FFN experts)"
    table = "\n".join([
        f"Command: `python bench/model_step.py --config {args.config} --size {args.size} "
        f"--steps {args.steps} --batch {args.batch}`; one process, fp32, batch {args.batch} x seq "
        f"{seq}, forward + backward + Adam, median of {args.steps} interleaved steps.",
        "",
        "| model | activated params/token | step ms | / GPT |",
        "|---|---|---|---|",
        f"| {name}, grouped experts | {target / 1e6:.3f}M | {lc * 1e3:.1f} | {lc / gp:.2f} |",
        f"| {name}, sequential experts | {target / 1e6:.3f}M | {ls * 1e3:.1f} | {ls / gp:.2f} |",
        f"| megatron GPT ({gcfg.num_layers} layers, ffn {gcfg.ffn_hidden_size}) | "
        f"{gpt_active / 1e6:.3f}M | {gp * 1e3:.1f} | 1.00 |",
        "",
        f"Ratio LongCat (grouped experts) / GPT: **{lc / gp:.2f}**",
    ])
    print(table)
    if not args.no_write:
        from bench.report import append_section

        print("appended to", append_section(f"Model step: {args.size} LongCat vs megatron GPT", table))
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
