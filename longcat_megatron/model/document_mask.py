"""Document boundaries of a packed micro-batch: attention stays inside each document without a
dense ``[s, s]`` mask.

Packed samples (pretraining windows across documents, SFT conversations packed to 128k) hold
several documents. :class:`DocumentMask` records where each document starts, per sample, as plain
Python integers: a few bytes a document instead of the ``b·s²`` booleans of a dense mask (2 GiB a
sample at 128k), nothing to move between devices, nothing to split under context parallelism.
The attention (:mod:`longcat_megatron.model.attention`) runs one causal attention per document piece
(:meth:`DocumentMask.pieces`): each query attends to the keys of its own document up to itself,
exactly what megatron's ``reset_attention_mask`` dense mask allows.

It travels in the batch's ``attention_mask`` slot (a dense mask tensor or a ``DocumentMask``), so the
model's ``forward(input_ids, position_ids, attention_mask, ...)`` contract stays megatron's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional, Sequence

import torch


def starts_after_eod(tokens: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Document starts of one sample's input ``tokens [s]``: 0 and the position after every EOD
    token (megatron's ``reset_attention_mask`` rule), int64."""
    after_eod = torch.nonzero(tokens[:-1] == eod_token_id).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long, device=tokens.device), after_eod])


@dataclass(frozen=True)
class DocumentMask:
    """Per sample of a ``[b, seq_length]`` micro-batch, the sorted start positions of its documents
    (the first is 0); a document runs to the next start, the last one to ``seq_length``."""

    starts: tuple[tuple[int, ...], ...]
    seq_length: int
    # pieces() per query range, computed once per micro-batch and reused by every attention layer
    _pieces: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for i, starts in enumerate(self.starts):
            if not starts or starts[0] != 0:
                raise ValueError(f"DocumentMask: sample {i}'s document starts {starts[:4]}... must "
                                 "begin with 0")
            if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= self.seq_length:
                raise ValueError(f"DocumentMask: sample {i}'s document starts must increase and stay "
                                 f"below seq_length={self.seq_length}")

    @classmethod
    def from_starts(cls, starts: Iterable[Sequence[int]], seq_length: int) -> "DocumentMask":
        """From per-sample start positions (any int sequences or 1-D tensors)."""
        return cls(tuple(tuple(int(x) for x in s) for s in starts), int(seq_length))

    @classmethod
    def from_eod(cls, tokens: torch.Tensor, eod_token_id: int) -> "DocumentMask":
        """Documents of input ``tokens [b, s]`` that end with ``eod_token_id``: a new document starts
        after every EOD token (megatron's ``reset_attention_mask`` rule)."""
        return cls.from_starts([starts_after_eod(row, eod_token_id).tolist() for row in tokens],
                               tokens.shape[1])

    @property
    def batch_size(self) -> int:
        return len(self.starts)

    @cached_property
    def same_for_every_sample(self) -> bool:
        """Whether all samples share one document layout (one attention call per piece then)."""
        return all(s == self.starts[0] for s in self.starts[1:])

    def pieces(self, sample: int, query_start: int, query_end: int) -> list[tuple[int, int, int]]:
        """Causal attention pieces for the queries at global positions ``[query_start, query_end)``
        of ``sample``: ``(key_start, piece_start, piece_end)`` per document they cover; the queries
        ``[piece_start, piece_end)`` attend to keys ``[key_start, piece_end)`` bottom-right
        aligned (query ``p`` sees keys ``key_start .. p``). Cached: every layer asks the same."""
        key = (sample, query_start, query_end)
        if key not in self._pieces:
            self._pieces[key] = self._compute_pieces(sample, query_start, query_end)
        return self._pieces[key]

    def _compute_pieces(self, sample: int, query_start: int, query_end: int):
        starts = self.starts[sample]
        ends = starts[1:] + (self.seq_length,)
        out = []
        for doc_start, doc_end in zip(starts, ends):
            lo, hi = max(doc_start, query_start), min(doc_end, query_end)
            if lo < hi:
                out.append((doc_start, lo, hi))
        return out

    def dense(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The same mask as megatron's dense bool ``[b, 1, s, s]`` (True = masked out); for tests and
        small sequences only."""
        s = self.seq_length
        marks = torch.zeros(self.batch_size, s, dtype=torch.int32)
        for i, starts in enumerate(self.starts):
            marks[i, list(starts[1:])] = 1
        doc = marks.cumsum(1).to(device)                                  # document index per token
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
        return (~allowed)[:, None]
