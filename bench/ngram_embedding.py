"""N-gram Embedding cost: does it grow with tokens or with table size?

    OMP_NUM_THREADS=1 python bench/ngram_embedding.py [--sizes 1e5,1e6,1e7] [--no-write]

One process, fp32, same run for every number. Measures
  * forward+backward time per token of NgramEmbedding for 1e5..1e7 rows per sub-table, (a) with a
    dense table gradient (no DDP: O(rows) zeros + index_add), (b) with the row gradients added
    straight into a main_grad buffer (the path under megatron DDP) and (c) with the tables frozen;
    the 1e7/1e5 ratio says which part depends on table size;
  * n-gram id throughput (LongCat-Flash-Lite hash: V=131072, N=4, K=4, 12 ids per token);
  * overhead vs megatron's plain VocabParallelEmbedding and vs a whole tiny GPT step on the same tokens;
  * per-rank table bytes of LongCat-Flash-Lite's 31.4B-parameter tables vs shard-group size.
Prints a markdown table and appends it to docs/benchmarks.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H, VOCAB, NGRAM_N, NGRAM_K = 64, 32768, 3, 2     # 4 sub-tables of width 16


def _median_time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ngram_step(emb, tokens, grad):
    def step():
        emb.zero_grad(set_to_none=True)
        emb.ngram_tables.grad_added_to_main_grad = False   # what DDP's zero_grad_buffer resets
        out = emb(tokens, None)
        out.backward(grad)
    return step


def _build(rows_per_table: float, tf):
    from longcat_megatron.model.ngram_config import NgramConfig
    from longcat_megatron.model.ngram_embedding import NgramEmbedding

    cfg = NgramConfig(ngram_vocab_size_ratio=rows_per_table / VOCAB + 0.37, emb_neighbor_num=NGRAM_N,
                      emb_split_num=NGRAM_K)
    emb = NgramEmbedding(tf, VOCAB, cfg, max_sequence_length=4096)
    emb.ngram_tables.data.normal_(0, 0.02)   # touch every page; values do not matter for timing
    return emb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="rows per sub-table, comma separated")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from longcat_megatron import runtime

    os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import build_gpt_chunk, transformer_config
    from longcat_megatron.model.ngram_config import NgramConfig, ngram_parameter_count
    from longcat_megatron.model.ngram_embedding import even_row_split
    from longcat_megatron.model.ngram_ids import ngram_ids
    from megatron.core import tensor_parallel

    runtime.initialize()
    model_cfg = ModelConfig(hidden_size=H, num_attention_heads=4, ffn_hidden_size=4 * H, num_layers=2,
                            vocab_size=VOCAB, max_position_embeddings=4096)
    tf = transformer_config(model_cfg)
    tf.perform_initialization = False
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
    tokens[torch.rand(tokens.shape, generator=gen) < 0.005] = 2
    ntok = tokens.numel()
    grad = torch.randn(args.seq, args.batch, H, generator=gen)

    lines = []
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    per_token = {}
    for rows in sizes:
        emb = _build(rows, tf)
        dense = _median_time(_ngram_step(emb, tokens, grad), args.steps)
        emb.ngram_tables.main_grad = torch.zeros_like(emb.ngram_tables)   # DDP's grad buffer
        fused = _median_time(_ngram_step(emb, tokens, grad), args.steps)
        del emb.ngram_tables.main_grad
        emb.ngram_tables.requires_grad_(False)
        frozen = _median_time(_ngram_step(emb, tokens, grad), args.steps)
        per_token[rows] = (dense / ntok, fused / ntok, frozen / ntok)
        total_rows = emb.total_rows
        del emb
        lines.append(f"| {rows:.0e} | {total_rows:,} | {dense / ntok * 1e6:.2f} | "
                     f"{fused / ntok * 1e6:.2f} | {frozen / ntok * 1e6:.2f} |")
    lo, hi = per_token[sizes[0]], per_token[sizes[-1]]

    lite = torch.randint(0, 131072, (8, 4096), generator=gen)
    lite[torch.rand(lite.shape, generator=gen) < 0.005] = 2
    t_ids = _median_time(lambda: ngram_ids(lite, vocab_size=131072, ratio=78, max_n=4, splits=4,
                                           eos_token_id=2), args.steps)
    ids_per_s = lite.numel() * 12 / t_ids

    plain = tensor_parallel.VocabParallelEmbedding(VOCAB, H, init_method=tf.init_method, config=tf)
    plain.weight.data.normal_(0, 0.02)
    grad_bsh = grad.transpose(0, 1).contiguous()

    def plain_step():
        plain.zero_grad(set_to_none=True)
        plain(tokens).backward(grad_bsh)
    t_plain = _median_time(plain_step, args.steps)
    emb = _build(sizes[0], tf)
    emb.ngram_tables.main_grad = torch.zeros_like(emb.ngram_tables)
    t_ngram = _median_time(_ngram_step(emb, tokens, grad), args.steps)

    gpt = build_gpt_chunk(model_cfg, tf, pre_process=True, post_process=True)
    for p in gpt.parameters():
        p.data.normal_(0, 0.02)
    positions = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    labels = torch.roll(tokens, -1, dims=1)

    def gpt_step():
        gpt.zero_grad(set_to_none=True)
        gpt(tokens, positions, None, labels=labels).sum().backward()
    t_gpt = _median_time(gpt_step, args.steps)

    cfg = NgramConfig()
    tables, _ = ngram_parameter_count(cfg, 131072, 3072)
    total_rows = sum(cfg.moduli(131072))
    group_lines = []
    for g in (1, 8, 16, 64, 128, 256):
        rows = max(e - s for s, e in even_row_split(total_rows, g))
        params = rows * 256
        group_lines.append(f"| {g} | {rows:,} | {params * 2 / 2**30:,.1f} | {params * 16 / 2**30:,.1f} |")

    date = datetime.date.today().isoformat()
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, one process, fp32")
    report = "\n".join([
        f"## N-gram Embedding cost ({date})",
        "",
        f"Machine: {machine}. Command: `python bench/ngram_embedding.py --sizes {args.sizes}`. "
        f"Tokens per step: {args.batch}x{args.seq} = {ntok:,}; H={H}, V={VOCAB:,}, N={NGRAM_N}, "
        f"K={NGRAM_K} (4 sub-tables of width {H // 4}); median of {args.steps} steps.",
        "",
        "| rows per sub-table | total rows | fwd+bwd us/token, dense table grad (no DDP) | "
        "fwd+bwd us/token, rows added into main_grad (under megatron DDP) | "
        "fwd+bwd us/token, tables frozen |",
        "|---|---|---|---|---|",
        *lines,
        "",
        f"Ratio largest/smallest table: {hi[0] / lo[0]:.2f} with a dense table gradient, "
        f"{hi[1] / lo[1]:.2f} with the gradient rows added into DDP's main_grad buffer (the path "
        f"taken in training), {hi[2] / lo[2]:.2f} with frozen tables. Not included: megatron "
        "zeroes the grad buffer and Adam visits every row once per optimizer step (O(rows/group) "
        "per global batch, independent of tokens).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| n-gram ids (Lite hash, 12 per token) | {ids_per_s / 1e6:.1f} M ids/s "
        f"({lite.numel() / t_ids / 1e6:.2f} M tokens/s) |",
        f"| plain VocabParallelEmbedding fwd+bwd | {t_plain / ntok * 1e6:.2f} us/token |",
        f"| NgramEmbedding fwd+bwd ({sizes[0]:.0e} rows/table, main_grad path) | "
        f"{t_ngram / ntok * 1e6:.2f} us/token "
        f"({t_ngram / t_plain:.1f}x plain) |",
        f"| tiny GPT step fwd+bwd (2 layers, H={H}) | {t_gpt / ntok * 1e6:.2f} us/token; n-gram extra "
        f"over plain = {(t_ngram - t_plain) / t_gpt:.1%} of it |",
        "",
        f"LongCat-Flash-Lite tables ({tables / 1e9:.2f}B parameters, {total_rows:,} rows x 256) per "
        "rank vs shard-group size (partition 'tensor_data'; 16 B/param = bf16 param + fp32 grad + "
        "fp32 master + Adam moments when the optimizer state is not sharded further):",
        "",
        "| group size | rows per rank | bf16 params GiB | params+grad+Adam GiB |",
        "|---|---|---|---|",
        *group_lines,
        "",
    ])
    print(report)
    if not args.no_write:
        path = os.path.join(ROOT, "docs", "benchmarks.md")
        with open(path, "a") as f:
            f.write("\n" + report)
        print(f"appended to {path}")
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
