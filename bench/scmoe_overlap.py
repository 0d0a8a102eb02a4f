"""ScMoE overlap on gloo processes: step time with the MoE all-to-alls asynchronous (dispatch in
flight during MLP0 + Attn1, combine during MLP1) vs synchronous, same model, interleaved steps.

    OMP_NUM_THREADS=1 python bench/scmoe_overlap.py [--procs 2] [--size h256] [--steps 10]

Each process is one expert-parallel rank (EP = procs, alltoall dispatcher, TP = PP = 1) of the
LongCat model of ``bench/model_step.py --size``; every process runs forward + backward on its own
micro-batch. Forward and full-step medians of rank 0 are printed and appended to docs/benchmarks.md
unless ``--no-write``. The overlap only concerns the forward pass (the backward all-to-alls are
synchronous), so the forward column is where a difference can show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(rank: int, world: int, port: int, size: str, steps: int, batch: int, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1")
    import torch
    import torch.distributed as dist

    from bench.model_step import SIZES
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.model.factory import build_model_chunk, transformer_config
    from longcat_megatron.model.moe import ZeroExpertMoE

    run = load_config("configs/tiny_longcat.yaml",
                      ["data.mock=true", "parallel.tensor=1", "parallel.sequence_parallel=false",
                       f"parallel.expert={world}", "model.moe_token_dispatcher_type=alltoall",
                       *SIZES[size]])
    cfg, seq = run.model, run.data.seq_length
    runtime.initialize(expert=world, num_experts=cfg.num_experts, seed=1)
    model = build_model_chunk(cfg, transformer_config(cfg, expert=world), pre_process=True,
                              post_process=True)
    moes = [m for m in model.modules() if isinstance(m, ZeroExpertMoE)]
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    pos = torch.arange(seq)[None].expand(batch, -1)
    times = {(mode, part): [] for mode in ("sync", "overlap") for part in ("fwd", "step")}
    for step in range(steps + 2):
        for mode in ("sync", "overlap"):
            for m in moes:
                m.overlap = mode == "overlap"
            dist.barrier()
            t0 = time.perf_counter()
            model.zero_grad()
            loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).mean()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if step >= 2:
                times[(mode, "fwd")].append(t1 - t0)
                times[(mode, "step")].append(t2 - t0)
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in times.items()})
    runtime.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--size", default="h256")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import multiprocessing as mp

    from longcat_megatron.runtime import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.procs, port, args.size, args.steps,
                                               args.batch, out)) for r in range(args.procs)]
    for p in procs:
        p.start()
    res = out.get(timeout=3600)
    for p in procs:
        p.join()
    rows = [f"| {mode} | {res[(mode, 'fwd')] * 1e3:.1f} | {res[(mode, 'step')] * 1e3:.1f} |"
            for mode in ("sync", "overlap")]
    table = "\n".join([
        f"Command: `python bench/scmoe_overlap.py --procs {args.procs} --size {args.size} "
        f"--steps {args.steps} --batch {args.batch}`; {args.procs} gloo processes = EP{args.procs} "
        f"(alltoall dispatcher), fp32, batch {args.batch} per rank, forward + backward, median of "
        f"{args.steps} interleaved steps on rank 0.",
        "",
        "| MoE all-to-alls | forward ms | forward + backward ms |",
        "|---|---|---|",
        *rows,
        "",
        f"Forward overlap / sync: **{res[('overlap', 'fwd')] / res[('sync', 'fwd')]:.2f}**; "
        f"step: **{res[('overlap', 'step')] / res[('sync', 'step')]:.2f}**",
    ])
    print(table)
    if not args.no_write:
        from bench.report import append_section

        print("appended to", append_section(f"ScMoE overlap: {args.procs} gloo processes", table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
