"""What deterministic mode and the silent-data-corruption checks cost per training step.

    OMP_NUM_THREADS=1 python bench/sdc_overhead.py [--iters 12] [--micro-batches 4] [--write]

One process (gloo, world size 1), the tiny LongCat with the N-gram Embedding at hidden 128 and
sequence 256, bf16 + the distributed optimizer. Each mode trains SHORT and SHORT + ITERS
iterations; the difference of the two wall times over ITERS is the time per step without start-up
(modes interleaved, the minimum over the repeats kept: this machine's shared cores drift).
Modes: everything off; ``train.rerun_mode=validate_results`` (megatron's rerun state machine: a
finiteness check per micro-batch, state saved per step); ``train.deterministic``; deterministic +
the replay of micro-batch 0 every step (``train.sdc_check_interval=1``, the worst case: a cluster
would use hundreds) and every 10 steps. On CPU the deterministic kernels are the default ones, so
its row measures the loop, not CUDA's deterministic kernels (bench/gpu_check.py measures those on a
GPU). ``--write`` appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")
MODES = {
    "off": [],
    "rerun_mode=validate_results": ["train.rerun_mode=validate_results"],
    "deterministic": ["train.deterministic=true"],
    "deterministic + replay every 10 steps": ["train.deterministic=true", "train.sdc_check_interval=10"],
    "deterministic + replay every step": ["train.deterministic=true", "train.sdc_check_interval=1"],
}
SHORT = 2


def _seconds(overrides: list, iters: int) -> float:
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    start = time.perf_counter()
    try:
        r = train(load_config(CONFIG, overrides + [f"train.train_iters={iters}"]))
    finally:
        runtime.shutdown()
    assert r.exit_code == 0 and r.iteration == iters, (r.exit_code, r.stop_reason)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/sdc_overhead.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=12, help="timed iterations per mode")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--repeats", type=int, default=3, help="timings per mode (the minimum is kept)")
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    from longcat_megatron import runtime

    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    runtime.silence_known_warnings()
    base = ["parallel.tensor=1", "parallel.sequence_parallel=false", "model.hidden_size=128",
            "data.seq_length=256", "train.micro_batch_size=1", f"train.global_batch_size={args.micro_batches}",
            "optimizer.bf16=true", "parallel.distributed_optimizer=true", "schedule.warmup_iters=1",
            "logging.log_interval=1000000", "logging.progress=false"]
    _seconds(base, SHORT)  # warm-up: imports, dataset caches, allocator
    # Round-robin over the modes, so that a machine that drifts (shared cores) slows all alike; the
    # minimum over the repeats is the least disturbed figure of each.
    per_step: dict = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, extra in MODES.items():
            short = _seconds(base + extra, SHORT)
            long = _seconds(base + extra, SHORT + args.iters)
            per_step[mode].append((long - short) / args.iters * 1e3)
            print(f"{mode}: {per_step[mode][-1]:.1f} ms/step", flush=True)
    ms = {mode: min(v) for mode, v in per_step.items()}
    rows = ["| mode | ms/step (min) | vs off | all runs (ms/step) |", "|---|---:|---:|---|"]
    rows += [f"| {mode} | {v:.1f} | {v / ms['off'] - 1:+.1%} | {', '.join(f'{x:.0f}' for x in per_step[mode])} |"
             for mode, v in ms.items()]
    table = "\n".join(rows)
    print(table)
    if args.write:
        from bench.report import append_section

        body = (f"Command: `OMP_NUM_THREADS=1 python bench/sdc_overhead.py --iters {args.iters} "
                f"--micro-batches {args.micro_batches} --repeats {args.repeats} --write` (1 process, tiny "
                f"LongCat + N-gram at hidden 128, seq 256, {args.micro_batches} micro-batches/step, bf16, "
                "distributed optimizer; per-step times without start-up, modes interleaved, minimum of the repeats).\n\n" + table +
                "\n\nOn CPU `train.deterministic` changes no kernel (CPU kernels are deterministic): its row "
                "is the loop's cost; CUDA's deterministic kernels are measured by bench/gpu_check.py "
                "(step 7) on a GPU. The replay costs about one micro-batch forward per checked step.")
        print("appended to " + append_section("Determinism and SDC checks: cost per step (CPU)", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
