"""bench/one_rank_rehearsal.py at tiny sizes: one rank of a 16-rank layout (TP2+SP, CP2, PP2, EP4,
N-gram tables over the expert group) on the fake process group, so that the full-width rehearsal
cannot rot; plus the fakes it relies on (balanced picks, all-to-all fill, N-gram row ids)."""

import os

import pytest
import torch

from bench import one_rank_rehearsal as rehearsal


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def test_balanced_picks_give_every_ffn_expert_the_same_tokens():
    fake = rehearsal._BalancedTorch(torch, num_ffn=256, num_zero=128, ffn_per_token=8)
    scores = torch.rand(1024, 256 + 128)
    values, idx = fake.topk(scores, 12, dim=-1, sorted=False)
    assert idx.shape == (1024, 12) and torch.equal(values, scores.gather(1, idx))
    ffn, zero = idx[:, :8], idx[:, 8:]
    assert (ffn < 256).all() and (zero >= 256).all()
    assert torch.bincount(ffn.reshape(-1), minlength=256).unique().tolist() == [32]
    assert torch.bincount(zero.reshape(-1) - 256, minlength=128).unique().tolist() == [32]
    assert all(len(set(row)) == 12 for row in idx.tolist())       # no expert twice per token


def test_all_to_all_fill_and_ngram_rows_mapped_into_the_local_shard():
    group = _Group(4)
    x = torch.arange(8.0).view(8, 1)
    out = torch.full((6, 1), -1.0)
    rehearsal._fill_all_to_all(out, x, [1, 1, 2, 2], [2, 2, 2, 2], group)
    assert out.view(-1).tolist() == [0.0, 2.0, 4.0, 5.0, 6.0, 7.0]
    ids, asked = torch.tensor([5, 900, 1700, 2600]), torch.empty(4, dtype=torch.long)
    rehearsal._NGRAM_ROWS.append((group, 1000, 1200))
    try:
        rehearsal._fill_all_to_all(asked, ids, [1, 1, 1, 1], [1, 1, 1, 1], group)
    finally:
        rehearsal._NGRAM_ROWS.clear()
    assert ((asked >= 1000) & (asked < 1200)).all()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_smoke_rank_runs_a_step_with_balanced_routing_and_counted_state_matches_the_plan():
    r = rehearsal.run_worker("smoke-first", steps=1, timeout=240)
    assert r["first"] and not r["last"] and r["world"] == 16
    assert r["layout"]["pipeline"] == 2 and r["layout"]["context"] == 2 and r["expert_data"] == 2
    step = r["steps"][0]
    assert step["forwards"] == 2 == r["micro_batches_run"]             # 1F1B: min(PP, m) in flight
    assert step["ffn_experts_per_token"] == 2.0 and step["load_max_over_mean"] == 1.0
    assert step["fwd_bwd_peak"] > 0 and step["held"] > 0
    assert step["cpu_causal_masks"] > 0                                 # CP2: counted, not on GPU
    assert {"input embedding", "layers"} <= set(rehearsal.group_parts(step["parts"]))
    c = rehearsal.compare(r)
    # Model state is exact arithmetic in the plan; the counted buffers add only DDP's padding.
    assert 0.9 < c["r_state"] < 1.1, c
    assert "| smoke-first | 16, 0 (first stage) | 2 / 2 / 2 / 4 / 1 / 2 / 2 |" in rehearsal.table([r])
