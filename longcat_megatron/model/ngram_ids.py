"""N-gram ids of LongCat-Flash-Lite's N-gram Embedding (exact released semantics).

For sub-table ``idx = (n-2)*K + k`` (order ``n = 2..N``, split ``k = 0..K-1``) the modulus is
``M_idx = int(ratio*V + 2*idx + 1)`` and the id of position ``i`` is

    id = (t_i + sum_{s=1}^{n-1} t'_{i-s} * (V^s mod M_idx)) mod M_idx      (int64)

where ``t'_{i-s}`` is the token ``s`` places back, or 0 when that place lies before the sequence start
or before the current document. Documents end at and include each EOS: the EOS token keeps its own
look-back, the token after it sees no predecessors. BOS is not a boundary.

``left_context`` (the up to N-1 tokens that precede ``tokens[:, 0]``) lets a context-parallel chunk
or a cached decode step compute the same ids as the whole sequence would.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

INT64_MAX = 2**63 - 1


def ngram_moduli(vocab_size: int, ratio: float, max_n: int, splits: int) -> list[int]:
    """Rows (= hash modulus) of every sub-table, in table order ``idx = (n-2)*K + k``."""
    m = ratio * vocab_size
    return [int(m + 2 * idx + 1) for idx in range((max_n - 1) * splits)]


def table_order(idx: int, splits: int) -> int:
    """The n-gram order n of sub-table ``idx``."""
    return idx // splits + 2


def ngram_weights(vocab_size: int, moduli: Sequence[int], splits: int, max_n: int) -> list[list[int]]:
    """``w[idx][s-1] = V^s mod M_idx`` for ``s < n(idx)``, else 0 (the unused look-back slots)."""
    weights = []
    for idx, mod in enumerate(moduli):
        n = table_order(idx, splits)
        row, p = [], 1
        for s in range(1, max_n):
            p = (p * vocab_size) % mod
            row.append(p if s < n else 0)
        weights.append(row)
    return weights


def shifted_predecessors(
    tokens: torch.Tensor, max_back: int, eos_token_id: Optional[int],
    left_context: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[max_back, b, s]``: entry ``s-1`` is the token ``s`` places back inside the current document,
    0 where there is none (sequence start, or an EOS at one of the places in between)."""
    b, seq = tokens.shape
    if left_context is None:
        left_context = tokens.new_zeros(b, 0)
    ctx = left_context[:, -max_back:] if max_back else left_context[:, :0]
    pad = max_back - ctx.shape[1]
    full = torch.cat([tokens.new_zeros(b, pad), ctx, tokens], dim=1)  # [b, L + s], L = max_back
    L = max_back
    if eos_token_id is not None:
        pos = torch.arange(full.shape[1], device=tokens.device).expand(b, -1)
        eos_pos = torch.where(full == eos_token_id, pos, torch.full_like(pos, -1))
        last_eos = torch.cummax(eos_pos, dim=1).values
        # Document start of position p: one after the last EOS strictly before p.
        doc_start = torch.cat([last_eos.new_full((b, 1), -1), last_eos[:, :-1]], dim=1) + 1
        doc_start = doc_start[:, L:]
    out = tokens.new_zeros(max_back, b, seq)
    p = torch.arange(L, L + seq, device=tokens.device)
    for s in range(1, max_back + 1):
        prev = full[:, L - s: L - s + seq]
        if eos_token_id is not None:
            prev = torch.where((p - s) >= doc_start, prev, torch.zeros_like(prev))
        out[s - 1] = prev
    return out


def ngram_ids(
    tokens: torch.Tensor,
    *,
    vocab_size: int,
    ratio: float,
    max_n: int,
    splits: int,
    eos_token_id: Optional[int],
    left_context: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token ids ``[b, s]`` -> n-gram ids ``[K*(N-1), b, s]`` (int64, row index inside each sub-table).

    ``left_context [b, c]``: the tokens before ``tokens[:, 0]`` (only the last N-1 are used); without
    it the sequence starts at ``tokens[:, 0]``. ``eos_token_id=None`` disables the document reset.
    """
    if tokens.dim() != 2:
        raise ValueError(f"ngram_ids: tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if max_n < 2 or splits < 1:
        raise ValueError(f"ngram_ids: need max_n >= 2 and splits >= 1 (got {max_n}, {splits})")
    tokens = tokens.long()
    moduli = ngram_moduli(vocab_size, ratio, max_n, splits)
    weights = ngram_weights(vocab_size, moduli, splits, max_n)
    bound = (vocab_size - 1) * (1 + sum(max(w) for w in weights))
    if bound > INT64_MAX:
        raise ValueError(f"ngram_ids: vocab {vocab_size} x moduli {max(moduli)} overflow int64")
    if left_context is not None:
        left_context = left_context.long().to(tokens.device)
    prev = shifted_predecessors(tokens, max_n - 1, eos_token_id, left_context)  # [N-1, b, s]
    device = tokens.device
    w = torch.tensor(weights, dtype=torch.int64, device=device).view(len(moduli), max_n - 1, 1, 1)
    mods = torch.tensor(moduli, dtype=torch.int64, device=device).view(-1, 1, 1)
    acc = tokens.unsqueeze(0).expand(len(moduli), -1, -1).clone()
    for s in range(max_n - 1):
        acc += prev[s].unsqueeze(0) * w[:, s]
    return torch.remainder(acc, mods)
