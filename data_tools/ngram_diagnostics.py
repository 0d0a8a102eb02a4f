"""Hash-collision diagnostics of the N-gram Embedding over a tokenized dataset.

    python -m data_tools.ngram_diagnostics --data PREFIX --vocab-size V --ratio R --n N --k K

Reads a megatron IndexedDataset (PREFIX.bin / PREFIX.idx), hashes every sequence exactly as the
model does (each sequence starts with no predecessors; EOS resets the context) and reports per
sub-table: distinct n-grams seen (with the in-document zero padding of short contexts), the fraction
of them that share their row with another n-gram (collide), the table rows hit, and the fullest
buckets. These are the numbers the LongCat-Flash-Lite paper used to choose table sizes (collisions
spike when a modulus sits near an integer multiple of V).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from longcat_megatron.model.ngram_ids import ngram_ids, ngram_moduli, shifted_predecessors, table_order


@dataclass
class TableStats:
    table: int
    order: int
    split: int
    rows: int
    positions: int
    distinct_ngrams: int
    colliding_ngrams: int
    rows_hit: int
    top_buckets: list = field(default_factory=list)   # [(row, distinct n-grams in it)]

    @property
    def collision_fraction(self) -> float:
        return self.colliding_ngrams / max(1, self.distinct_ngrams)

    @property
    def hit_fraction(self) -> float:
        return self.rows_hit / self.rows


def _padded_batches(sequences: Iterable[np.ndarray], batch: int):
    """Right-padded [b, L] batches plus a validity mask (right padding leaves earlier ids unchanged)."""
    chunk = []
    for seq in sequences:
        if len(seq):
            chunk.append(torch.as_tensor(np.asarray(seq, dtype=np.int64)))
        if len(chunk) == batch:
            yield _pad(chunk)
            chunk = []
    if chunk:
        yield _pad(chunk)


def _pad(chunk):
    longest = max(len(c) for c in chunk)
    tokens = torch.zeros(len(chunk), longest, dtype=torch.int64)
    valid = torch.zeros(len(chunk), longest, dtype=torch.bool)
    for i, c in enumerate(chunk):
        tokens[i, : len(c)] = c
        valid[i, : len(c)] = True
    return tokens, valid


def collision_stats(
    sequences: Iterable[np.ndarray], vocab_size: int, ratio: float, max_n: int, splits: int,
    eos_token_id: Optional[int], top: int = 5, batch: int = 64,
) -> list[TableStats]:
    """Per sub-table collision statistics over ``sequences`` (each hashed from its own start)."""
    moduli = ngram_moduli(vocab_size, ratio, max_n, splits)
    keys: list[list[torch.Tensor]] = [[] for _ in range(max_n - 1)]   # per order n: [P, n] windows
    ids: list[list[torch.Tensor]] = [[] for _ in moduli]
    for tokens, valid in _padded_batches(sequences, batch):
        prev = shifted_predecessors(tokens, max_n - 1, eos_token_id)          # [N-1, b, s]
        table_ids = ngram_ids(tokens, vocab_size=vocab_size, ratio=ratio, max_n=max_n,
                              splits=splits, eos_token_id=eos_token_id)
        window = torch.stack([tokens] + list(prev), dim=-1)[valid]            # [P, N]
        for n in range(2, max_n + 1):
            keys[n - 2].append(window[:, :n])
        for t in range(len(moduli)):
            ids[t].append(table_ids[t][valid])
    stats = []
    for t, mod in enumerate(moduli):
        n = table_order(t, splits)
        all_keys = torch.cat(keys[n - 2]) if keys[n - 2] else torch.zeros(0, n, dtype=torch.int64)
        all_ids = torch.cat(ids[t]) if ids[t] else torch.zeros(0, dtype=torch.int64)
        uniq, inverse = torch.unique(all_keys, dim=0, return_inverse=True)
        key_ids = torch.zeros(len(uniq), dtype=torch.int64)
        key_ids[inverse] = all_ids
        rows, per_row = torch.unique(key_ids, return_counts=True)
        order = torch.argsort(per_row, descending=True, stable=True)[:top]
        stats.append(TableStats(
            table=t, order=n, split=t % splits, rows=mod, positions=len(all_ids),
            distinct_ngrams=len(uniq), colliding_ngrams=int(per_row[per_row > 1].sum()),
            rows_hit=len(rows),
            top_buckets=[(int(rows[i]), int(per_row[i])) for i in order if per_row[i] > 1],
        ))
    return stats


def read_sequences(prefix: str, max_sequences: Optional[int]):
    """Sequences of a megatron IndexedDataset (``prefix``.bin/.idx)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    count = len(dataset) if max_sequences is None else min(max_sequences, len(dataset))
    for i in range(count):
        yield dataset[i]


def format_table(stats: list[TableStats]) -> str:
    head = (f"{'table':>5} {'n':>2} {'k':>2} {'rows M':>12} {'positions':>10} {'distinct':>10} "
            f"{'collide':>8} {'rows hit':>10} {'hit %':>7}  top buckets (row: n-grams)")
    lines = [head]
    for s in stats:
        buckets = ", ".join(f"{r}:{c}" for r, c in s.top_buckets) or "-"
        lines.append(
            f"{s.table:>5} {s.order:>2} {s.split:>2} {s.rows:>12,} {s.positions:>10,} "
            f"{s.distinct_ngrams:>10,} {s.collision_fraction:>8.4%} {s.rows_hit:>10,} "
            f"{s.hit_fraction:>7.3%}  {buckets}"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.ngram_diagnostics",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="IndexedDataset prefix (PREFIX.bin, PREFIX.idx)")
    parser.add_argument("--vocab-size", type=int, required=True, help="base vocabulary size V")
    parser.add_argument("--ratio", type=float, required=True,
                        help="ngram_vocab_size_ratio (may be fractional)")
    parser.add_argument("--n", type=int, required=True, help="emb_neighbor_num N (largest n-gram order)")
    parser.add_argument("--k", type=int, required=True, help="emb_split_num K (sub-tables per order)")
    parser.add_argument("--eos", type=int, default=2,
                        help="EOS id that resets the context; -1: none (default 2)")
    parser.add_argument("--max-sequences", type=int, default=None, help="only the first N sequences")
    parser.add_argument("--top", type=int, default=5, help="collision buckets listed per table")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    missing = [p for p in (args.data + ".bin", args.data + ".idx") if not os.path.exists(p)]
    if missing:
        print(f"ngram_diagnostics: --data {args.data}: {', '.join(missing)} not found; pass the "
              "prefix of a megatron .bin/.idx pair (without the extension)", file=sys.stderr)
        return 2
    seqs = read_sequences(args.data, args.max_sequences)
    stats = collision_stats(seqs, args.vocab_size, args.ratio, args.n, args.k,
                            None if args.eos < 0 else args.eos, top=args.top)
    if args.json:
        print(json.dumps([dict(asdict(s), collision_fraction=s.collision_fraction,
                               hit_fraction=s.hit_fraction) for s in stats], indent=1))
    else:
        print(format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
