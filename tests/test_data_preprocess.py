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
    return {2: "malformed_json", 3: "missing_key", 5: "empty_document", 6: "invalid_utf8",
            8: "not_a_string", 9: "blank_line", 10: "not_an_object"}


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
    assert summary["documents"] == len(GOOD) and summary["skipped"] == len(bad)
    assert summary["tokens"] == sum(len(d) for d in direct(tokenizer, GOOD))
    assert {code: e["count"] for code, e in summary["skipped_by_reason"].items()} == {c: 1 for c in bad.values()}
    with open(out + ".skipped.tsv") as f:
        listed = [line.split("\t")[:2] for line in f]
    assert listed == [[f"{src}:{line}", code] for line, code in sorted(bad.items())]
    assert "skipped records: 7" in res.stdout and f"{src}:2: malformed_json" in res.stdout
    check_indexed_pair(out)


def test_cli_strict_stops_at_first_bad_line_without_output(tiny, tmp_path):
    src = str(tmp_path / "bad.jsonl")
    write_bad_jsonl(src)
    out = str(tmp_path / "strict")
    res = run_cli("data_tools.preprocess", "--input", src, "--tokenizer", os.path.join(tiny, "tokenizer"),
                  "--output-prefix", out, "--workers", "2", "--strict", "--quiet")
    assert res.returncode == 2
    assert f"{src}:2: malformed_json" in res.stderr and "Traceback" not in res.stderr
    assert not [f for f in os.listdir(tmp_path) if "strict" in f]


def test_parquet_text_and_merge(tiny, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [GOOD[0], None, "", GOOD[1]]}), str(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": [GOOD[2]] * 50}), str(tmp_path / "whole.parquet"))
    (tmp_path / "c.txt").write_text(GOOD[3])
    out = str(tmp_path / "multi")
    res = run_cli("data_tools.preprocess", "--input", str(tmp_path / "*.parquet"), str(tmp_path / "c.txt"),
                  "--tokenizer", os.path.join(tiny, "tokenizer"), "--output-prefix", out,
                  "--workers", "2", "--merge", "--quiet")
    assert res.returncode == 0, res.stderr
    # Sorted inputs: a.parquet, whole.parquet, c.txt (given last).
    expected = direct(tokenizer, [GOOD[0], GOOD[1]]) + direct(tokenizer, [GOOD[2]] * 50) + direct(tokenizer, [GOOD[3]])
    assert read_docs(out) == expected
    summary = json.load(open(out + ".summary.json"))
    assert summary["skipped_by_reason"]["null_value"]["examples"] == [f"{tmp_path}/a.parquet:row 2: null_value "
                                                                      "(column 'text')"]
    assert summary["skipped_by_reason"]["empty_document"]["examples"] == [f"{tmp_path}/a.parquet:row 3: "
                                                                          "empty_document"]
    assert not os.path.exists(out + ".00000.bin")  # shards were merged away


def test_interrupted_writer_leaves_nothing_complete(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(KeyboardInterrupt):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_documents(np.arange(10), np.array([4, 6]))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_merge_cli_is_transactional_and_keeps_shard_inputs(tmp_path, monkeypatch):
    """python -m data_tools.merge: shards OUT.00000/OUT.00001 merged into OUT stay (no
    --remove-inputs); a merge that fails midway leaves the previous OUT and no run directory; a
    merge of one shard replaces OUT and removes only that input (--remove-inputs)."""
    from data_tools import merge

    out = str(tmp_path / "out")
    shards = [f"{out}.{i:05d}" for i in range(2)]
    for i, prefix in enumerate(shards):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_documents(np.arange(12) % 50 + i, np.full(4, 3))
            w.finalize()
    assert merge.main(["--inputs", f"{out}.*.idx", "--output-prefix", out]) == 0
    assert read_docs(out) == read_docs(shards[0]) + read_docs(shards[1])
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}

    def fail_midway(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(IndexedWriter, "append_raw", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        merge.main(["--inputs", shards[1], "--output-prefix", out])
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    second = read_docs(shards[1])
    assert merge.main(["--inputs", shards[1], "--output-prefix", out, "--remove-inputs"]) == 0
    assert read_docs(out) == second
    assert not os.path.exists(shards[1] + ".bin") and os.path.exists(shards[0] + ".bin")


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


def file_digests(directory: str) -> dict:
    import hashlib

    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, n))}


def start_fifo_run(tiny, tmp_path, out, workers="1"):
    """A preprocess CLI reading a pipe we feed by hand (so it is stopped at a known point)."""
    fifo = str(tmp_path / "stream.jsonl")
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.preprocess", "--input", fifo, "--tokenizer",
                             os.path.join(tiny, "tokenizer"), "--output-prefix", out, "--workers", workers,
                             "--chunk-mb", "0.00001", "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = open(fifo, "w")
    for _ in range(20):
        writer.write(json.dumps({"text": GOOD[1]}) + "\n")
    writer.flush()
    return proc, writer


def wait_for(condition, proc, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def run_dirs(directory) -> list:
    return [n for n in os.listdir(directory) if ".run-" in n]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_cli_keeps_the_previous_output(tiny, tmp_path, sig):
    """Ctrl-C / SIGTERM / SIGKILL mid-run: the previous complete output is untouched; a clean stop
    removes its run directory, a killed run's directory is removed by the next run."""
    import signal

    from data_tools.preprocess import main

    outdir = tmp_path / "data"
    out = str(outdir / "out")
    (tmp_path / "old.jsonl").write_text(json.dumps({"text": GOOD[0]}) + "\n")
    assert main(["--input", str(tmp_path / "old.jsonl"), "--tokenizer", os.path.join(tiny, "tokenizer"),
                 "--output-prefix", out, "--workers", "0", "--quiet"]) == 0
    before = file_digests(outdir)
    proc, writer = start_fifo_run(tiny, tmp_path, out)
    wait_for(lambda: any(n.endswith(".bin.tmp-%d" % proc.pid) for d in run_dirs(outdir)
                         for n in os.listdir(outdir / d)), proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    writer.close()
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[sig], err
    if sig == "SIGKILL":
        # The CLI cannot print once killed; a worker still in multiprocessing's spawn bootstrap
        # may report the parent's pipe closing (EOF) and exit. Nothing of ours may fail.
        assert "data_tools" not in err and ("Traceback" not in err or "spawn_main" in err), err
    else:
        assert "Traceback" not in err
    assert file_digests(outdir) == before
    assert read_docs(out) == direct_ids(tiny, [GOOD[0]])
    assert len(run_dirs(outdir)) == (1 if sig == "SIGKILL" else 0)
    # The next run cleans a dead run's leftovers and replaces the output.
    (tmp_path / "new.jsonl").write_text(json.dumps({"text": GOOD[2]}) + "\n")
    assert main(["--input", str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl"), "--tokenizer",
                 os.path.join(tiny, "tokenizer"), "--output-prefix", out, "--workers", "0", "--quiet"]) == 0
    assert run_dirs(outdir) == [] and not os.path.exists(out + ".bin")
    assert read_docs(out + ".00001") == direct_ids(tiny, [GOOD[2]])


def direct_ids(tiny, texts):
    from tokenizers import Tokenizer

    return direct(Tokenizer.from_file(os.path.join(tiny, "tokenizer", "tokenizer.json")), texts)
