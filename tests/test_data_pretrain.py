"""Pretraining data: resume exactness, DP-size independence, document boundaries, fingerprints.

Fixture datasets are written with megatron-core's own ``IndexedDatasetBuilder`` (independent of our
preprocessing tool) so these tests check the loader alone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.fingerprint import DataFingerprintError
from longcat_megatron.data.horizon import sample_horizon
from longcat_megatron.data.indexed_files import IndexedDataError
from longcat_megatron.data.pretrain import build_pretrain_iterators, check_fingerprint, dataset_fingerprint
from longcat_megatron.data.sampler import SamplerError
from longcat_megatron.model.document_mask import DocumentMask
from tests.harness import run_distributed

EOD = 1
SEQ = 16


def write_indexed(prefix: str, docs: list[list[int]]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def random_docs(seed: int, n: int, lo: int = 3, hi: int = 40, base: int = 10) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(base, base + 200, size=rng.integers(lo, hi))) + [EOD] for _ in range(n)]


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    a, b = str(d / "a"), str(d / "b")
    write_indexed(a, random_docs(0, 150))
    write_indexed(b, random_docs(1, 90, base=300))
    return [0.7, a, 0.3, b]


def cfg_for(paths, **kw) -> DataConfig:
    base = dict(paths=paths, seq_length=SEQ, split="90,10,0", eod_token_id=EOD,
                reset_position_ids=True, reset_attention_mask=True)
    base.update(kw)
    return DataConfig(**base)


def collect(cfg, *, consumed, n, dp_rank, dp_size, mbs=2, gbs=8, train_samples=64):
    train, _ = build_pretrain_iterators(
        cfg, seed=7, micro_batch_size=mbs, global_batch_size=gbs, train_samples=train_samples,
        eval_samples=8, dp_rank=dp_rank, dp_size=dp_size, consumed_train_samples=consumed,
    )
    return [next(train) for _ in range(n)]


def global_order(per_rank: list[list[dict]]) -> dict:
    """Interleave per-rank micro-batches into global sample order, concatenated along batch."""
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask"):
        chunks = [per_rank[r][step][key] for step in range(len(per_rank[0])) for r in range(len(per_rank))]
        if isinstance(chunks[0], DocumentMask):
            out[key] = DocumentMask(sum((c.starts for c in chunks), ()), chunks[0].seq_length)
        else:
            out[key] = torch.cat(chunks) if chunks[0] is not None else None
    return out


def assert_same(x: dict, y: dict) -> None:
    for key in x:
        if x[key] is None or isinstance(x[key], DocumentMask):
            assert y[key] == x[key], key
        else:
            assert torch.equal(x[key], y[key]), key


def test_resume_and_dp_change_keep_global_order(blend):
    cfg = cfg_for(blend)
    # 2N = 32 samples straight on dp=2 (mbs=2 -> 8 micro-steps, each 4 samples).
    straight = global_order([collect(cfg, consumed=0, n=8, dp_rank=r, dp_size=2) for r in range(2)])
    first = global_order([collect(cfg, consumed=0, n=4, dp_rank=r, dp_size=2) for r in range(2)])
    resumed = global_order([collect(cfg, consumed=16, n=4, dp_rank=r, dp_size=2) for r in range(2)])
    halves = {k: None if first[k] is None else torch.cat([first[k], resumed[k]]) for k in first
              if k != "attention_mask"}
    halves["attention_mask"] = DocumentMask(first["attention_mask"].starts
                                            + resumed["attention_mask"].starts, SEQ)
    assert_same(straight, halves)
    # Resume the second half on dp=1 (same global batch size 8).
    dp1 = global_order([collect(cfg, consumed=16, n=8, dp_rank=0, dp_size=1)])
    tail = {k: v[16:] for k, v in straight.items() if k != "attention_mask"}
    tail["attention_mask"] = DocumentMask(straight["attention_mask"].starts[16:], SEQ)
    assert_same(tail, dp1)
    # The blend really mixes both datasets (token ranges differ) and samples are not all alike.
    toks = straight["tokens"]
    assert ((toks >= 10) & (toks < 210)).any() and (toks >= 300).any()
    assert len({tuple(t.tolist()) for t in toks}) == toks.shape[0]


def test_batch_contents_respect_documents(blend):
    cfg = cfg_for(blend)
    batch = collect(cfg, consumed=0, n=1, dp_rank=0, dp_size=1, mbs=4, gbs=4)[0]
    assert batch["tokens"].shape == (4, SEQ) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    documents = batch["attention_mask"]
    assert isinstance(documents, DocumentMask) and documents.batch_size == 4
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    # The same mask as megatron-core's dense reset_attention_mask of these tokens.
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    for tokens, dense in zip(batch["tokens"], documents.dense()):
        megatron_mask = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, False, True)[0]
        assert torch.equal(megatron_mask.bool(), dense)
    for tokens, pos, mask in zip(batch["tokens"], batch["position_ids"], documents.dense()[:, 0]):
        doc = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (tokens[:-1] == EOD).long()]), 0)
        for i in range(SEQ):
            start = int((doc == doc[i]).nonzero()[0])
            assert pos[i] == i - start
            visible = ~mask[i]
            allowed = torch.zeros(SEQ, dtype=torch.bool)
            allowed[start : i + 1] = True
            assert torch.equal(visible, allowed), (i, tokens)
    plain = collect(cfg_for(blend, reset_attention_mask=False, reset_position_ids=False),
                    consumed=0, n=1, dp_rank=0, dp_size=1, mbs=4, gbs=4)[0]
    assert plain["attention_mask"] is None
    assert torch.equal(plain["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    assert torch.equal(plain["tokens"], batch["tokens"])


def test_mock_is_deterministic_and_in_vocab():
    cfg = DataConfig(mock=True, seq_length=SEQ, mock_vocab_size=64)
    a = collect(cfg, consumed=8, n=3, dp_rank=1, dp_size=2)
    b = collect(cfg, consumed=8, n=3, dp_rank=1, dp_size=2)
    for x, y in zip(a, b):
        assert_same(x, y)
        assert x["attention_mask"] is None and int(x["tokens"].max()) < 64


def test_longer_run_keeps_order_and_fingerprint(blend):
    """Extending a run (more train samples) must not reorder the samples already planned."""
    cfg = cfg_for(blend)
    horizon = sample_horizon(cfg, 0)  # the most samples that stay within one epoch of each dataset
    assert 64 < horizon < 100_000
    short = global_order([collect(cfg, consumed=0, n=6, dp_rank=0, dp_size=1, train_samples=64)])
    long = global_order([collect(cfg, consumed=0, n=6, dp_rank=0, dp_size=1, train_samples=horizon)])
    assert_same(short, long)
    check_fingerprint(dataset_fingerprint(cfg, seed=7, train_samples=64),
                      dataset_fingerprint(cfg, seed=7, train_samples=horizon), allow_change=False)
    # Past one epoch of the blend the order does depend on the length: the fingerprint says so.
    with pytest.raises(DataFingerprintError, match="sample_horizon"):
        check_fingerprint(dataset_fingerprint(cfg, seed=7, train_samples=64),
                          dataset_fingerprint(cfg, seed=7, train_samples=100_000), allow_change=False)


def test_fingerprint_detects_changes(blend, tmp_path):
    cfg = cfg_for(blend)
    fp = dataset_fingerprint(cfg, seed=7, train_samples=64)
    check_fingerprint(fp, dataset_fingerprint(cfg, seed=7, train_samples=64), allow_change=False)
    changed = dataset_fingerprint(cfg_for([0.5, blend[1], 0.5, blend[3]]), seed=8, train_samples=64)
    with pytest.raises(DataFingerprintError) as err:
        check_fingerprint(fp, changed, allow_change=False)
    assert "datasets[0].weight" in str(err.value) and "seed" in str(err.value)
    check_fingerprint(fp, changed, allow_change=True)
    # Same content under another path is still the same data.
    for ext in (".bin", ".idx"):
        os.link(blend[1] + ext, str(tmp_path / "a") + ext)
    moved = dataset_fingerprint(cfg_for([0.7, str(tmp_path / "a"), 0.3, blend[3]]), seed=7, train_samples=64)
    check_fingerprint(fp, moved, allow_change=False)


def test_mismatched_bin_idx_is_a_clear_error(tmp_path):
    good, other = str(tmp_path / "good"), str(tmp_path / "other")
    write_indexed(good, random_docs(3, 20))
    write_indexed(other, random_docs(4, 25))
    os.replace(other + ".idx", good + ".idx")  # .idx from a different run
    with pytest.raises(IndexedDataError, match="do not match"):
        collect(cfg_for([good]), consumed=0, n=1, dp_rank=0, dp_size=1)


def test_bad_batch_layout_is_a_clear_error():
    cfg = DataConfig(mock=True, seq_length=SEQ)
    with pytest.raises(SamplerError, match="global_batch_size"):
        collect(cfg, consumed=0, n=1, dp_rank=0, dp_size=3, mbs=2, gbs=8)
    with pytest.raises(SamplerError, match="resume position"):
        collect(cfg, consumed=3, n=1, dp_rank=0, dp_size=2)


def _distributed_batches(paths, cache_dir):
    from longcat_megatron import runtime

    runtime.initialize(seed=1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = cfg_for(paths, cache_dir=cache_dir)
    return collect(cfg, consumed=8, n=3, dp_rank=rank, dp_size=world)


def test_distributed_build_matches_single_process(blend, tmp_path):
    """Under gloo (cached indices built on rank 0 behind a barrier) the order is the same."""
    per_rank = run_distributed(_distributed_batches, 2, blend, str(tmp_path / "cache"), timeout=240)
    single = global_order([collect(cfg_for(blend), consumed=8, n=6, dp_rank=0, dp_size=1)])
    assert_same(global_order(per_rank), single)
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / "cache"))


def test_long_context_samples_reset_positions_without_dense_mask():
    """128k mid-training shape: full-length samples, positions restart per document, no [s, s]
    mask; document masking comes as document starts (a DocumentMask)."""
    seq = 131072
    cfg = DataConfig(mock=True, seq_length=seq, reset_position_ids=True, mock_vocab_size=64)
    batch = collect(cfg, consumed=0, n=1, dp_rank=0, dp_size=1, mbs=1, gbs=1, train_samples=2)[0]
    assert batch["tokens"].shape == (1, seq) and batch["attention_mask"] is None
    tokens, pos = batch["tokens"][0], batch["position_ids"][0]
    after_eod = torch.nonzero(tokens[:-1] == cfg.eod_token_id).flatten() + 1
    assert len(after_eod) > 1 and bool((pos[after_eod] == 0).all())
    masked = DataConfig(mock=True, seq_length=seq, reset_position_ids=True, reset_attention_mask=True,
                        mock_vocab_size=64)
    masked.validate()
    batch = collect(masked, consumed=0, n=1, dp_rank=0, dp_size=1, mbs=1, gbs=1, train_samples=2)[0]
    assert batch["attention_mask"] == DocumentMask.from_starts([[0] + after_eod.tolist()], seq)
