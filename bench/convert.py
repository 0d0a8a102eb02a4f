"""Conversion throughput and peak memory, both directions, on a synthetic LongCat checkpoint.

    python bench/convert.py [--hidden 2048] [--experts 32] [--layers 4] [--workers N] [--workdir DIR] [--keep]

1. builds a random LongCat model at the given size in one process and saves it with the training
   loop's checkpoint writer (a real torch_dist checkpoint, fp32);
2. the disk: plain sequential read of the checkpoint's files **from the disk, not the page cache**
   (the files are flushed and dropped from the cache first with ``posix_fadvise(DONTNEED)``, as a
   1 TB checkpoint would be: far larger than memory), 64 MB ``readinto``; and a plain 1 GB write into
   the work directory with its ``fsync``;
3. ``to_hf --workers N`` in a fresh process, its input dropped from the cache the same way: tensor
   seconds and GB/s (of the bytes its input holds on disk: the HF side's zero-expert tensors are
   holes, neither read nor written), the time its final fsync took (the converters flush their output before the
   rename that commits it), GB/s including that flush, peak RSS, and each GB/s / disk read rate;
4. ``from_hf --workers N`` (streaming) of that output, the same figures (its input: the HF files);
5. the RSS of a process that only imports the same libraries (the floor).

Prints a markdown table (append it to docs/benchmarks.md by hand or with --append).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUILD = r"""
import json, os, sys, torch
sys.path.insert(0, {root!r})
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
from longcat_megatron import runtime
from longcat_megatron.config import RunConfig, save_config
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.factory import build_model_chunk, transformer_config
from longcat_megatron.training.checkpointing import TrainState, save_checkpoint
cfg = ModelConfig(**json.loads({cfg!r}))
runtime.initialize(num_experts=cfg.num_experts)
model = build_model_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
n = sum(p.numel() * p.element_size() for p in model.parameters())
save_checkpoint({ckpt!r}, [model], None, None, TrainState(iteration=1),
                config_yaml_writer=lambda p: save_config(RunConfig(model=cfg), p))
print(json.dumps({{"bytes": n}}))
"""

_IMPORTS_ONLY = r"""
import sys; sys.path.insert(0, {root!r})
import torch, transformers, megatron.core, safetensors, ckpt_convert.to_hf, ckpt_convert.from_hf
"""


def bench_config(hidden: int, experts: int, layers: int, vocab: int) -> dict:
    return dict(arch="longcat", num_layers=layers, hidden_size=hidden, num_attention_heads=16,
                ffn_hidden_size=2 * hidden, vocab_size=vocab, num_experts=experts,
                zero_expert_num=experts // 2, moe_router_topk=4, moe_ffn_hidden_size=hidden // 4,
                q_lora_rank=hidden // 4, kv_lora_rank=hidden // 8, qk_nope_head_dim=64,
                qk_rope_head_dim=32, v_head_dim=64, mtp_num_layers=1, max_position_embeddings=4096)


def run_measured(cmd: list, env: dict) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes of the command and its descendants, stdout)."""
    script = ("import resource, subprocess, sys, time, json\n"
              "t = time.perf_counter()\n"
              f"p = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
              "dt = time.perf_counter() - t\n"
              "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
              "sys.stderr.write(p.stderr[-3000:] if p.returncode else '')\n"
              "print(json.dumps({'rc': p.returncode, 's': dt, 'rss': rss, 'out': p.stdout[-2000:]}))\n")
    # cwd=ROOT: ``python -m ckpt_convert...`` must import this tree's converters (``-m`` puts the
    # working directory first on sys.path), not those of wherever the bench was started from.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return res["s"], res["rss"], res["out"]


def conversion_seconds(stdout: str) -> float:
    """The seconds the CLI itself reports for the tensor data ('tensor data 12.3s'), i.e. without
    interpreter start-up, config writing or the from_hf skeleton."""
    import re

    m = re.search(r"tensor data ([0-9.]+)s", stdout) or re.search(r" in ([0-9.]+)s", stdout)
    if not m:
        raise RuntimeError(f"no timing in output: {stdout!r}")
    return float(m.group(1))


def drop_from_page_cache(path: str) -> None:
    """Flush every file under ``path`` and drop it from the page cache (``posix_fadvise``), so the
    next read comes from the disk (no root needed; the VM's host may still cache)."""
    for d, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def flush_seconds(stdout: str) -> float:
    """The seconds the CLI reports for flushing its output to disk."""
    import re

    m = re.search(r"flushed to disk in ([0-9.]+)s", stdout)
    if not m:
        raise RuntimeError(f"no flush timing in output: {stdout!r}")
    return float(m.group(1))


def read_rate(path: str) -> float:
    """GB/s of a plain sequential read of every file under ``path`` (64 MB reads into one buffer),
    from the disk (dropped from the page cache first)."""
    drop_from_page_cache(path)
    buf = memoryview(bytearray(64 << 20))
    t = time.perf_counter()
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    # bytes stored on disk: holes (to_hf's zero-expert tensors) read as zeros without disk I/O
    return stored_bytes(path) / 1e9 / max(time.perf_counter() - t, 1e-9)


def write_rate(directory: str, nbytes: int = 10**9) -> float:
    """GB/s of a plain sequential write of ``nbytes`` into ``directory`` and its fsync (the
    converters flush their output too), the file removed afterwards."""
    block = bytes(64 << 20)
    path = os.path.join(directory, ".bench-write-rate")
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        os.fsync(f.fileno())
    rate = max(1, nbytes // len(block)) * len(block) / 1e9 / max(time.perf_counter() - t, 1e-9)
    os.remove(path)
    return rate


def stored_bytes(path: str) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks: holes do not count)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--workers", type=int, default=None,
                   help="--workers for both converters (default: theirs, CPU count up to 8)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--append", action="store_true", help="append the table to docs/benchmarks.md")
    args = p.parse_args()
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT, TORCHDYNAMO_DISABLE="1")
    ckpt, hf_dir, back = (os.path.join(work, n) for n in ("ckpt", "hf", "back"))
    cfg = bench_config(args.hidden, args.experts, args.layers, args.vocab)
    try:
        t = time.perf_counter()
        build = subprocess.run([sys.executable, "-c", _BUILD.format(root=ROOT, cfg=json.dumps(cfg), ckpt=ckpt)],
                               capture_output=True, text=True, env=env)
        if build.returncode:
            raise RuntimeError(build.stderr[-3000:])
        print(f"built synthetic checkpoint in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        ckpt_bytes = stored_bytes(ckpt)
        workers = ["--workers", str(args.workers)] if args.workers else []
        _, floor, _ = run_measured([sys.executable, "-c", _IMPORTS_ONLY.format(root=ROOT)], env)
        disk_write = write_rate(work)
        read_to = read_rate(ckpt)
        drop_from_page_cache(ckpt)
        w_to, rss_to, out_to = run_measured([sys.executable, "-m", "ckpt_convert.to_hf", "--load", ckpt,
                                        "--output", hf_dir, "--no-progress", "--max-shard-size", "1GB",
                                        *workers], env)
        hf_bytes = stored_bytes(hf_dir)
        read_from = read_rate(hf_dir)
        drop_from_page_cache(hf_dir)
        w_from, rss_from, out_from = run_measured([sys.executable, "-m", "ckpt_convert.from_hf", "--hf", hf_dir,
                                            "--save", back, "--no-progress", *workers], env)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    s_to, s_from = conversion_seconds(out_to), conversion_seconds(out_from)
    f_to, f_from = flush_seconds(out_to), flush_seconds(out_from)
    gb = 1e9
    nw = args.workers or min(8, os.cpu_count() or 1)
    # each direction's rate counts the bytes its input holds on disk (what it must read)
    g_to, g_from = ckpt_bytes / gb / s_to, hf_bytes / gb / s_from
    d_to, d_from = ckpt_bytes / gb / (s_to + f_to), hf_bytes / gb / (s_from + f_from)
    rows = [
        "| direction | data | tensor s | flush s | GB/s (incl. flush) | disk read GB/s (same files, "
        "not cached) | GB/s / disk read (incl. flush) | wall s (incl. imports) | peak RSS | "
        "peak RSS / data |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| megatron → HF (`to_hf --workers {nw}`) | {ckpt_bytes / gb:.2f} GB | {s_to:.2f} | {f_to:.2f} | "
        f"{g_to:.2f} ({d_to:.2f}) | {read_to:.2f} | {g_to / read_to:.2f} ({d_to / read_to:.2f}) | "
        f"{w_to:.1f} | {rss_to / gb:.2f} GB | {rss_to / ckpt_bytes:.2f} |",
        f"| HF → megatron (`from_hf --workers {nw}`, streaming) | {hf_bytes / gb:.2f} GB | {s_from:.2f} | "
        f"{f_from:.2f} | {g_from:.2f} ({d_from:.2f}) | {read_from:.2f} | {g_from / read_from:.2f} "
        f"({d_from / read_from:.2f}) | {w_from:.1f} | {rss_from / gb:.2f} GB | {rss_from / hf_bytes:.2f} |",
        f"| (imports only: RSS floor) | | | | | | | | {floor / gb:.2f} GB | |",
        f"| (disk: plain 1 GB write + fsync into the work directory) | | | | {disk_write:.2f} | | | | | |",
    ]
    header = (f"\n### Checkpoint conversion (bench/convert.py; hidden {args.hidden}, {args.layers} layers, "
              f"{args.experts}+{args.experts // 2} experts, vocab {args.vocab}, fp32, "
              f"{os.cpu_count()} CPU cores, work dir {work}, load average "
              f"{os.getloadavg()[0]:.1f})\n\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.append:
        with open(os.path.join(ROOT, "docs", "benchmarks.md"), "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
