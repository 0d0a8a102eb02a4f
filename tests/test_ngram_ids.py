"""N-gram ids: the reference vectors of longcat_architecture.md §2.4, a brute-force per-position
reference with EOS inside, left context (CP halo / cached decode) and fractional ratios."""

import random

import pytest
import torch

from longcat_megatron.model.ngram_ids import ngram_ids, ngram_moduli

LITE = dict(vocab_size=131072, ratio=78, max_n=4, splits=4, eos_token_id=2)


def test_lite_reference_vectors():
    tokens = torch.tensor([[1, 100, 2000, 30000, 2, 5, 7]])
    expected = {  # §2.4 table (computed independently by the reference notes)
        0: [1, 131172, 2885583, 6583575, 6291074, 5, 655367],
        3: [1, 131172, 2885577, 6583425, 6288770, 5, 655367],
        4: [1, 131172, 7064759, 5333150, 1730752, 5, 655367],
        7: [1, 131172, 7054673, 4324754, 2010802, 5, 655367],
        8: [1, 131172, 7051311, 2818559, 965698, 5, 655367],
        11: [1, 131172, 7041225, 9357031, 9607001, 5, 655367],
    }
    ids = ngram_ids(tokens, **LITE)
    assert ids.shape == (12, 1, 7) and ids.dtype == torch.int64
    for idx, row in expected.items():
        assert ids[idx, 0].tolist() == row, idx


def test_lite_moduli():
    mods = ngram_moduli(131072, 78, 4, 4)
    assert mods == [10223616 + 2 * i + 1 for i in range(12)]
    assert sum(mods) * 256 == 31_406_985_216


def test_fractional_ratio_moduli():
    # LongCat-2.0 style ratio: M = int(ratio*V + 2*idx + 1)
    mods = ngram_moduli(163840, 100.567, 5, 4)
    assert len(mods) == 16 and mods[0] == int(100.567 * 163840) + 1
    assert all(b - a == 2 for a, b in zip(mods, mods[1:]))


def brute_force_ids(tokens, vocab_size, ratio, max_n, splits, eos_token_id, context=()):
    """Per position: walk back up to n-1 places, stop at the sequence start or at an EOS that is not
    the current token (SGLang reference rule); Python big ints, mod at the end."""
    seq = list(context) + list(tokens)
    start = len(context)
    out = []
    for idx in range((max_n - 1) * splits):
        n = idx // splits + 2
        mod = int(ratio * vocab_size + 2 * idx + 1)
        row = []
        for p in range(start, len(seq)):
            acc = seq[p]
            for s in range(1, n):
                q = p - s
                if q < 0 or (eos_token_id is not None and seq[q] == eos_token_id):
                    break
                acc += seq[q] * pow(vocab_size, s, mod)
            row.append(acc % mod)
        out.append(row)
    return out


@pytest.mark.parametrize("max_n,splits,ratio,eos", [(4, 4, 78, 2), (3, 2, 5.37, 7), (5, 3, 12.5, None)])
def test_matches_brute_force_with_eos(max_n, splits, ratio, eos):
    rng = random.Random(max_n * 31 + splits)
    vocab = 1000
    batch = []
    for _ in range(3):
        row = [rng.randrange(vocab) for _ in range(40)]
        for p in rng.sample(range(40), 6):
            row[p] = eos if eos is not None else 0
        row[0] = 1  # BOS is an ordinary token
        batch.append(row)
    ids = ngram_ids(torch.tensor(batch), vocab_size=vocab, ratio=ratio, max_n=max_n, splits=splits,
                    eos_token_id=eos)
    for b, row in enumerate(batch):
        ref = brute_force_ids(row, vocab, ratio, max_n, splits, eos)
        assert ids[:, b].tolist() == ref


def test_consecutive_eos_and_eos_at_start():
    toks = [2, 2, 9, 2, 5, 6, 2, 2]
    ids = ngram_ids(torch.tensor([toks]), vocab_size=50, ratio=3.5, max_n=4, splits=2, eos_token_id=2)
    assert ids[:, 0].tolist() == brute_force_ids(toks, 50, 3.5, 4, 2, 2)


def test_left_context_equals_whole_sequence():
    rng = random.Random(5)
    vocab = 700
    row = [rng.randrange(vocab) for _ in range(50)]
    for p in (7, 8, 23, 31):
        row[p] = 2
    full = ngram_ids(torch.tensor([row]), vocab_size=vocab, ratio=6.25, max_n=4, splits=3, eos_token_id=2)
    for cut in (1, 2, 3, 8, 9, 24, 49):
        part = ngram_ids(torch.tensor([row[cut:]]), vocab_size=vocab, ratio=6.25, max_n=4, splits=3,
                         eos_token_id=2, left_context=torch.tensor([row[:cut]]))
        assert torch.equal(part, full[:, :, cut:]), cut


def test_token_by_token_decode_with_context():
    rng = random.Random(9)
    row = [rng.randrange(300) for _ in range(20)]
    row[6] = 2
    full = ngram_ids(torch.tensor([row]), vocab_size=300, ratio=4.4, max_n=4, splits=2, eos_token_id=2)
    for p in range(len(row)):
        ctx = torch.tensor([row[max(0, p - 3): p]], dtype=torch.long)
        step = ngram_ids(torch.tensor([[row[p]]]), vocab_size=300, ratio=4.4, max_n=4, splits=2,
                         eos_token_id=2, left_context=ctx)
        assert torch.equal(step[:, :, 0], full[:, :, p]), p


def test_bad_input_is_clear():
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        ngram_ids(torch.tensor([1, 2, 3]), **LITE)
