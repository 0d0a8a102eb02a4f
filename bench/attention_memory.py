"""Peak memory of one LongCat shortcut layer's forward + backward vs sequence length, for the
attention backends (eager / SDPA) and the activation-recompute settings (none / selective / full).

One process per backend (one rank, fp32, batch 1); per recompute setting: build the layer, run a
small warm-up step, then per sequence length reset the kernel's peak-RSS counter (``/proc/self/clear_refs``) and report
``VmHWM - VmRSS before the step``: the extra resident memory the step needed at its peak
(activations kept for the backward, transient buffers, gradients). glibc is told to ``mmap`` every
allocation above 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at
once and RSS follows the live tensors. Linux only.

    python bench/attention_memory.py [--seqs 1024,2048,4096] [--selective-parts] [--no-write] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One shortcut layer (2 MLA blocks, 2 dense MLPs, MoE with zero experts) with MLA's shape ratios:
# q·k head dim 48 (nope 32 + rope 16) != v head dim 32.
LAYER = dict(arch="longcat", num_layers=1, hidden_size=256, num_attention_heads=8,
             ffn_hidden_size=512, vocab_size=1024, max_position_embeddings=8192, num_experts=8,
             zero_expert_num=2, moe_router_topk=3, moe_ffn_hidden_size=128, q_lora_rank=128,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
BACKENDS = ("eager", "sdpa")
METHOD = ("Method: peak = VmHWM after resetting it (/proc/self/clear_refs) minus VmRSS before the "
          "step; held = VmRSS after the forward minus before (what the backward keeps); glibc "
          "MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the resident set; one process per "
          "backend, a 128-token warm-up step per recompute setting.")
NOTE = ("Reading: with SDPA both columns grow 2.0x per doubling of s (linear); eager grows ~3.7x "
        "(the s x s scores). Full recompute keeps only the layer input (held ~0) but recomputes the "
        "whole layer in its backward, so a single layer's peak is unchanged: its gain is the held "
        "memory of every layer and micro-batch in flight. Selective keeps the latents instead of "
        "q, k, v (and, with eager, not the s x s probabilities).")
RECOMPUTE = ("none", "selective", "full")


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def measure(backend: str, cases: list[tuple[int, str]]) -> dict:
    """MiB of extra resident memory of one step per ``(seq, recompute)`` case, in this process:
    ``held`` after the forward (what the backward keeps: multiplies with layers and micro-batches
    in flight) and ``peak`` over forward + backward. ``recompute`` is a ``train.recompute`` value
    or ``selective=core_attn+mla_up_proj`` (selective recompute of the named modules only)."""
    import gc

    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import LongcatBlock
    from longcat_megatron.model.rotary import InterleavedRotary

    runtime.initialize(seed=1)
    cfg = ModelConfig(**LAYER, attention_backend=backend)
    rotary = InterleavedRotary(cfg)
    blocks = {}

    def step(block, s: int, after_forward=lambda: None) -> None:
        x = torch.randn(s, 1, cfg.hidden_size, requires_grad=True)
        angles = rotary.angles(torch.arange(s)[None], x.dtype)
        loss = block(x, angles).square().mean()
        after_forward()
        loss.backward()
        for _, layer in block.layers.items():
            layer.mlp.router.end_step()

    out = {}
    for seq, recompute in cases:
        if recompute not in blocks:
            mode, _, modules = recompute.partition("=")
            tf = transformer_config(cfg, recompute=mode)
            if modules:
                tf.recompute_modules = modules.split("+")
            blocks[recompute] = LongcatBlock(cfg, tf).train()
            step(blocks[recompute], 128)        # warm-up: lazy init, thread pools, grads allocated
        gc.collect()
        before = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                            # reset VmHWM to the current RSS
        held = []
        step(blocks[recompute], seq, lambda: held.append(_kib("VmRSS")))
        out[f"{seq}|{recompute}"] = {"held": (held[0] - before) / 1024,
                                     "peak": (_kib("VmHWM") - before) / 1024}
    return out


def run_backend(backend: str, cases: list[tuple[int, str]]) -> dict:
    """``measure`` in a fresh process (own allocator; glibc mmaps large blocks)."""
    from longcat_megatron import runtime

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               TORCHDYNAMO_DISABLE="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(runtime.free_port()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    spec = ",".join(f"{seq}|{rc}" for seq, rc in cases)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", backend, spec],
                         env=env, capture_output=True, text=True, timeout=3000)
    if out.returncode:
        raise RuntimeError(f"{backend} {spec} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {(int(k.split("|")[0]), backend, k.split("|")[1]): v for k, v in got.items()}


def table(seqs: list[int], results: dict, what: str) -> str:
    head = " | ".join(f"s={s} MiB" for s in seqs)
    lines = [f"| backend | recompute | {head} | growth {seqs[0]}->{seqs[-1]} MiB | "
             f"x per 2x s (last step) |",
             "|---|---|" + "---|" * (len(seqs) + 2)]
    for backend in BACKENDS:
        for rc in RECOMPUTE:
            vals = [results[(s, backend, rc)][what] for s in seqs]
            ratio = f"{vals[-1] / vals[-2]:.2f}" if len(vals) > 1 and vals[-2] >= 1 else "-"
            cells = " | ".join(f"{v:,.0f}" for v in vals)
            lines.append(f"| {backend} | {rc} | {cells} | {vals[-1] - vals[0]:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="1024,2048,4096")
    parser.add_argument("--no-write", action="store_true", help="print only (no docs/benchmarks.md)")
    parser.add_argument("--selective-parts", action="store_true",
                        help="also: each selective module alone, at the longest sequence")
    parser.add_argument("--plot", help="also draw peak and held memory vs sequence length (PNG)")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "CASES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        backend, spec = args.worker
        cases = [(int(c.split("|")[0]), c.split("|")[1]) for c in spec.split(",")]
        print(json.dumps(measure(backend, cases)))
        return 0
    seqs = [int(s) for s in args.seqs.split(",")]
    parts = ("core_attn", "mla_up_proj", "core_attn+mla_up_proj") if args.selective_parts else ()
    results = {}
    for backend in BACKENDS:
        cases = [(seq, rc) for rc in RECOMPUTE for seq in seqs]
        cases += [(seqs[-1], f"selective={m}") for m in parts]
        results.update(run_backend(backend, cases))
        for seq, rc in cases:
            r = results[(seq, backend, rc)]
            print(f"seq {seq} {backend:5s} {rc:9s} held {r['held']:8,.0f} MiB  "
                  f"peak {r['peak']:8,.0f} MiB", flush=True)
    extra = ""
    if parts:
        rows = ["| backend | selective modules | peak MiB | held after forward MiB |",
                "|---|---|---|---|"]
        for backend in BACKENDS:
            for m in parts:
                r = results[(seqs[-1], backend, f"selective={m}")]
                rows.append(f"| {backend} | {m} | {r['peak']:,.0f} | {r['held']:,.0f} |")
        extra = (f"\n\nSelective recompute by module at s={seqs[-1]} (\"moe_act\" acts only in "
                 "the grouped-expert module):\n\n" + "\n".join(rows))
    body = ("Peak over forward + backward:\n\n" + table(seqs, results, "peak")
            + "\n\nHeld after the forward (activations kept for the backward):\n\n"
            + table(seqs, results, "held") + extra)
    print(body)
    if args.plot:
        from longcat_megatron.plotting import Panel, plot_panels

        def curves(key):
            return {f"{b}, recompute {rc}": (seqs, [results[(q, b, rc)][key] for q in seqs],
                                             {"group": rc, "label": f"recompute {rc}",
                                              "linestyle": "-" if b == BACKENDS[0] else "--"})
                    for b in BACKENDS for rc in RECOMPUTE}
        styles = [(f"{b} attention", "-" if b == BACKENDS[0] else "--") for b in BACKENDS]
        plot_panels(args.plot, [
            Panel("Peak memory of one shortcut layer, forward + backward", "MiB above the step's start",
                  curves("peak"), xlabel="sequence length (tokens)", logx=True, logy=True, styles=styles),
            Panel("Held after the forward (kept for the backward)", "MiB", curves("held"),
                  xlabel="sequence length (tokens)", logx=True, logy=True, styles=styles)])
        print("plot:", args.plot)
    if not args.no_write:
        from bench.report import append_section

        shape = ", ".join(f"{k}={v}" for k, v in LAYER.items() if k not in ("arch", "vocab_size"))
        flag = " --selective-parts" if parts else ""
        text = (f"Command: `python bench/attention_memory.py --seqs {args.seqs}{flag}`. One shortcut "
                f"layer ({shape}), fp32, batch 1, one rank. {METHOD}\n\n" + body + "\n\n" + NOTE)
        print("written to", append_section("Attention memory: one shortcut layer fwd+bwd", text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
