"""ngram_diagnostics on a tiny IndexedDataset: counts equal a brute-force dict computation."""

import json
import random
from collections import defaultdict

import numpy as np
import torch

from data_tools import ngram_diagnostics
from tests.test_ngram_ids import brute_force_ids

V, RATIO, N, K, EOS = 40, 1.3, 3, 2, 2   # tiny tables (53..59 rows) so that collisions happen


def make_dataset(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def brute_force_stats(docs):
    """Per table: {row: set of distinct windows}, windows = (t_i, t'_{i-1}, ..) with the EOS rule."""
    tables = [defaultdict(set) for _ in range(K * (N - 1))]
    for doc in docs:
        ids = brute_force_ids(doc, V, RATIO, N, K, EOS)
        for t, row in enumerate(ids):
            n = t // K + 2
            for p, rid in enumerate(row):
                window = [doc[p]]
                for s in range(1, n):
                    q = p - s
                    ok = q >= 0 and all(doc[j] != EOS for j in range(q, p))
                    window.append(doc[q] if ok else 0)
                tables[t][rid].add(tuple(window))
    return tables


def test_counts_match_brute_force(tmp_path, capsys):
    rng = random.Random(4)
    docs = []
    for _ in range(12):
        doc = [rng.randrange(V) for _ in range(rng.randrange(5, 30))]
        doc[-1] = EOS
        docs.append(doc)
    prefix = str(tmp_path / "tiny")
    make_dataset(prefix, docs)

    code = ngram_diagnostics.main(["--data", prefix, "--vocab-size", str(V), "--ratio", str(RATIO),
                                   "--n", str(N), "--k", str(K), "--eos", str(EOS), "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    expected = brute_force_stats(docs)
    assert len(got) == len(expected)
    for stats, buckets in zip(got, expected):
        assert stats["distinct_ngrams"] == sum(len(v) for v in buckets.values())
        assert stats["colliding_ngrams"] == sum(len(v) for v in buckets.values() if len(v) > 1)
        assert stats["rows_hit"] == len(buckets)
        assert stats["positions"] == sum(len(d) for d in docs)
        if stats["top_buckets"]:
            row, count = stats["top_buckets"][0]
            assert count == max(len(v) for v in buckets.values()) == len(buckets[row])
    assert any(s["colliding_ngrams"] for s in got)   # the tiny tables do collide

    assert ngram_diagnostics.main(["--data", prefix, "--vocab-size", str(V), "--ratio", str(RATIO),
                                   "--n", str(N), "--k", str(K)]) == 0
    assert "top buckets" in capsys.readouterr().out


def test_missing_data_is_clear(tmp_path, capsys):
    code = ngram_diagnostics.main(["--data", str(tmp_path / "nope"), "--vocab-size", "10",
                                   "--ratio", "2.5", "--n", "3", "--k", "2"])
    assert code == 2
    assert "--data" in capsys.readouterr().err
