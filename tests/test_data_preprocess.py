"""Preprocessing CLI: bad records, 2 workers, output == direct tokenization, atomic outputs, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.indexed_writer import IndexedWriter
from data_tools.merge import merge_datasets
from data_tools.tiny_corpus import build_tiny_corpus
from longcat_megatron.data.indexed_files import IndexedDataError, check_indexed_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2  # <|endoftext|> in the tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny"))
    build_tiny_corpus(out, vocab_size=512, max_mb=0.25)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(tiny, "tokenizer", "tokenizer.json"))


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


GOOD = ["Hello world.", "def f(x):\n    return x + 1\n", "ünïcödé text — with dashes", "  spaced  "]


def write_bad_jsonl(path: str) -> dict:
    """Good docs interleaved with one line of each bad kind; returns {line number: reason word}."""
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),
        b'{"text": "unterminated',                       # 2 malformed JSON
        json.dumps({"body": "no text key"}).encode(),     # 3 missing key
        json.dumps({"text": GOOD[1]}).encode(),
        json.dumps({"text": "   "}).encode(),             # 5 empty document
        b'{"text": "bad \xff\xfe bytes"}',                # 6 invalid UTF-8
        json.dumps({"text": GOOD[2]}, ensure_ascii=False).encode(),
        json.dumps({"text": 42}).encode(),                # 8 not a string
        b"",                                              # 9 blank line
        json.dumps([1, 2]).encode(),                      # 10 not an object
        json.dumps({"text": GOOD[3]}).encode(),
    ]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return {2: "malformed JSON", 3: "missing key", 5: "empty document", 6: "invalid UTF-8",
            8: "not a string", 9: "blank line", 10: "not an object"}


def direct(tokenizer, texts):
    return [tokenizer.encode(t, add_special_tokens=False).ids + [EOS] for t in texts]


def test_cli_skips_bad_lines_and_matches_direct_tokenization(tiny, tokenizer, tmp_path):
    src = str(tmp_path / "bad.jsonl")
    bad = write_bad_jsonl(src)
    out = str(tmp_path / "out")
    res = run_cli("data_tools.preprocess", "--input", src, "--tokenizer", os.path.join(tiny, "tokenizer"),
                  "--output-prefix", out, "--workers", "2", "--chunk-mb", "0.00001", "--quiet")
    assert res.returncode == 0, res.stderr
    assert read_docs(out) == direct(tokenizer, GOOD)
    summary = json.load(open(out + ".summary.json"))
    assert summary["documents"] == len(GOOD) and summary["skipped_count"] == len(bad)
    assert summary["tokens"] == sum(len(d) for d in direct(tokenizer, GOOD))
    listed = {int(s.split(":")[1]): s for s in summary["skipped"]}
    assert set(listed) == set(bad)
    for line, word in bad.items():
        assert word in listed[line].replace("holds a int", "not a string"), listed[line]
    assert "skipped: 7" in res.stdout and f"{src}:2: malformed JSON" in res.stdout
    check_indexed_pair(out)


def test_cli_strict_stops_at_first_bad_line_without_output(tiny, tmp_path):
    src = str(tmp_path / "bad.jsonl")
    write_bad_jsonl(src)
    out = str(tmp_path / "strict")
    res = run_cli("data_tools.preprocess", "--input", src, "--tokenizer", os.path.join(tiny, "tokenizer"),
                  "--output-prefix", out, "--workers", "2", "--strict", "--quiet")
    assert res.returncode == 2
    assert f"{src}:2: malformed JSON" in res.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith("strict")]


def test_parquet_text_and_merge(tiny, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [GOOD[0], None, "", GOOD[1]]}), str(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": [GOOD[2]] * 50}), str(tmp_path / "whole.parquet"))
    with open(tmp_path / "whole.parquet", "rb") as f:
        data = f.read()
    with open(tmp_path / "b_truncated.parquet", "wb") as f:
        f.write(data[: len(data) // 2])
    (tmp_path / "c.txt").write_text(GOOD[3])
    out = str(tmp_path / "multi")
    res = run_cli("data_tools.preprocess", "--input", str(tmp_path / "*.parquet"), str(tmp_path / "c.txt"),
                  "--tokenizer", os.path.join(tiny, "tokenizer"), "--output-prefix", out,
                  "--workers", "2", "--merge", "--quiet")
    assert res.returncode == 0, res.stderr
    # Sorted inputs: a.parquet, b_truncated.parquet (skipped whole), whole.parquet, c.txt (given last).
    expected = direct(tokenizer, [GOOD[0], GOOD[1]]) + direct(tokenizer, [GOOD[2]] * 50) + direct(tokenizer, [GOOD[3]])
    assert read_docs(out) == expected
    summary = json.load(open(out + ".summary.json"))
    reasons = " | ".join(summary["skipped"])
    assert "a.parquet:row 2: missing (null) value" in reasons and "a.parquet:row 3: empty document" in reasons
    assert "b_truncated.parquet: unreadable Parquet" in reasons
    assert not os.path.exists(out + ".00000.bin")  # shards were merged away


def test_interrupted_writer_leaves_nothing_complete(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(KeyboardInterrupt):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_documents(np.arange(10), np.array([4, 6]))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_truncated_or_mixed_pairs_are_detected(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for prefix, n in ((a, 7), (b, 9)):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_documents(np.arange(n * 3) % 50, np.full(n, 3))
            w.finalize()
    merged = str(tmp_path / "m")
    merge_datasets([a, b], merged)
    assert read_docs(merged) == read_docs(a) + read_docs(b)
    # Same-size .bin from another run (identical lengths, other tokens): caught by the sidecar.
    with IndexedWriter(str(tmp_path / "c"), np.uint16) as w:
        w.add_documents((np.arange(21) + 1) % 50, np.full(7, 3))
        w.finalize()
    check_indexed_pair(a)
    os.replace(str(tmp_path / "c.bin"), a + ".bin")
    with pytest.raises(IndexedDataError, match="different preprocessing runs"):
        check_indexed_pair(a)
    # Truncated .bin.
    with open(b + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(IndexedDataError, match="do not match"):
        check_indexed_pair(b)


def test_tiny_corpus_is_idempotent_and_loads_with_transformers(tiny):
    stamp = os.path.join(tiny, ".complete")
    before = os.path.getmtime(os.path.join(tiny, "corpus.jsonl"))
    build_tiny_corpus(tiny, vocab_size=512, max_mb=0.25)
    assert os.path.getmtime(os.path.join(tiny, "corpus.jsonl")) == before and os.path.isfile(stamp)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer"))
    assert tok.eos_token_id == EOS and tok.pad_token_id == 0 and tok.bos_token_id == 1
    assert len(tok) == 512


def test_help_explains():
    res = run_cli("data_tools.preprocess", "--help")
    assert res.returncode == 0 and "--json-key" in res.stdout and "EOS" in res.stdout


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_cli_leaves_no_complete_looking_output(tiny, tmp_path, sig):
    """The input is a pipe we feed by hand, so the run is interrupted at a known point."""
    import signal
    import time

    fifo = str(tmp_path / "stream.jsonl")
    os.mkfifo(fifo)
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.preprocess", "--input", fifo, "--tokenizer",
                             os.path.join(tiny, "tokenizer"), "--output-prefix", out, "--workers", "1",
                             "--chunk-mb", "0.00001", "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = open(fifo, "w")
    for _ in range(20):
        writer.write(json.dumps({"text": GOOD[1]}) + "\n")
    writer.flush()
    deadline = time.monotonic() + 120
    while not [f for f in os.listdir(tmp_path) if f.startswith("out.bin.tmp-")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=120)
    writer.close()
    left = sorted(os.listdir(tmp_path))
    assert not any(f in left for f in ("out.bin", "out.idx", "out.meta.json", "out.summary.json")), left
    if sig == "SIGINT":  # a clean interrupt also removes its temporary files
        assert left == ["stream.jsonl"], left
    with pytest.raises(IndexedDataError):
        check_indexed_pair(out)
