"""Adversarial inputs for the data tools and the shared data check: every bad record is a counted
skip (exact counts, fixed reason codes), every bad file a named error with the fix, never a
traceback, a hang or a changed previous output; good documents still equal direct tokenization."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from data_tools.indexed_writer import IndexedWriter
from data_tools.preprocess import main as preprocess_main
from longcat_megatron.data.check import check_data
from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.indexed_files import IndexedDataError
from tests.test_data_preprocess import file_digests, read_docs, run_cli, run_dirs, start_fifo_run, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2


def direct(tokenizer, texts):
    return [tokenizer.encode(t, add_special_tokens=False).ids + [EOS] for t in texts]


# (raw line, expected skip code or None for a good document, its text)
RECORDS = [
    ("\ufeff" + json.dumps({"text": "first line after a BOM"}), None, "first line after a BOM"),
    ('{"text": "lone \\ud800 surrogate"}', "lone_surrogate", None),
    ('{"text": "tab\tinside"}', "malformed_json", None),
    ('{"text": 5}', "not_a_string", None),
    ('{"text": null}', "not_a_string", None),
    ("[1, 2]", "not_an_object", None),
    ('"just a string"', "not_an_object", None),
    ('{"txt": "typo key"}', "missing_key", None),
    ("", "blank_line", None),
    ('{"text": "   "}', "empty_document", None),
    (json.dumps({"text": "a good one"}), None, "a good one"),
    ('{"text": "cut', "malformed_json", None),
    (json.dumps({"text": "surrogate pair \U0001F600 is fine"}), None, "surrogate pair \U0001F600 is fine"),
]


def write_corpus(directory) -> tuple[list[str], dict]:
    """a.jsonl (RECORDS + one invalid UTF-8 line) and b.jsonl.gz; returns (good texts, {code: count})."""
    os.makedirs(directory, exist_ok=True)
    lines = [r[0].encode("utf-8") for r in RECORDS] + [b'{"text": "bad \xff byte"}']
    with open(os.path.join(directory, "a.jsonl"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    gz_texts = ["gzipped one", "gzipped two"]
    with gzip.open(os.path.join(directory, "b.jsonl.gz"), "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in gz_texts))
    counts: dict = {"invalid_utf8": 1}
    for _, code, _ in RECORDS:
        if code:
            counts[code] = counts.get(code, 0) + 1
    return [r[2] for r in RECORDS if r[1] is None] + gz_texts, counts


def test_adversarial_corpus_counts_exactly_and_never_reads_its_own_outputs(tiny, tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    good, counts = write_corpus(corpus)
    with IndexedWriter(str(corpus / "other"), np.uint16) as w:  # another dataset lying in the input dir
        w.add_documents(np.array([5, 6, EOS]), np.array([3]))
        w.finalize()
    out = str(corpus / "out")  # the output prefix is inside the input directory
    args = ["--input", str(corpus), "--tokenizer", os.path.join(tiny, "tokenizer"), "--output-prefix", out,
            "--quiet"]
    res = run_cli("data_tools.preprocess", *args, "--workers", "2", "--chunk-mb", "0.00001")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    n_a = len([r for r in RECORDS if r[1] is None])
    assert read_docs(out + ".00000") + read_docs(out + ".00001") == direct(tokenizer, good)
    assert len(read_docs(out + ".00000")) == n_a
    first = json.load(open(out + ".summary.json"))
    assert first["documents"] == len(good)
    assert {c: e["count"] for c, e in first["skipped_by_reason"].items()} == counts
    assert first["skipped_by_reason"]["missing_key"]["examples"] == [
        f"{corpus}/a.jsonl:8: missing_key (no 'text'; keys: 'txt')"]
    assert first["skipped_by_reason"]["not_an_object"]["examples"][1].endswith(":7: not_an_object (the line is a "
                                                                                "JSON string)")
    assert f"{corpus}/a.jsonl:3: malformed_json (Invalid control character (column 14))" in res.stdout
    with open(out + ".skipped.tsv") as f:
        assert len(f.readlines()) == sum(counts.values())
    # Re-run in place: its own outputs (and the other dataset) are left out, the result is the same.
    assert preprocess_main(args + ["--workers", "0"]) == 0
    second = json.load(open(out + ".summary.json"))
    assert second["documents"] == first["documents"] and second["skipped_by_reason"] == first["skipped_by_reason"]
    assert len(second["shards"]) == 2
    assert {os.path.basename(p) for p in second["excluded_inputs"]} == {
        "out.00000.bin", "out.00000.idx", "out.00000.meta.json", "out.00001.bin", "out.00001.idx",
        "out.00001.meta.json", "out.summary.json", "out.skipped.tsv", "other.bin", "other.idx", "other.meta.json"}


def _bad_tokenizer(tiny, tmp_path, name, edit):
    d = tmp_path / name
    shutil.copytree(os.path.join(tiny, "tokenizer"), d)
    edit(d)
    return str(d)


def test_bad_files_are_named_errors_and_keep_the_previous_output(tiny, tokenizer, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jsonl").write_text(json.dumps({"text": "good"}) + "\n")
    (src / "bad_line.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (src / "empty.jsonl").write_text("")
    shutil.copy(src / "good.jsonl", src / "plain.jsonl.gz")  # not gzip
    with gzip.open(src / "whole.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"line {i} " * 50}) + "\n" for i in range(200)))
    data = (src / "whole.jsonl.gz").read_bytes()
    (src / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"text": ["x"] * 100}), str(src / "t.parquet"))
    (src / "cut.parquet").write_bytes((src / "t.parquet").read_bytes()[:200])
    toks = os.path.join(tiny, "tokenizer")
    corrupt_json = _bad_tokenizer(tiny, tmp_path, "corrupt_json",
                                  lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": '))
    corrupt_cfg = _bad_tokenizer(tiny, tmp_path, "corrupt_cfg",
                                 lambda d: (d / "tokenizer_config.json").write_text("{not json"))

    def eos_not_in_vocab(d):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "</nope>"}))

    bad_eos = _bad_tokenizer(tiny, tmp_path, "bad_eos", eos_not_in_vocab)
    outdir = tmp_path / "out"
    prefix = str(outdir / "ds")

    def run(inputs, tok_dir=toks, *extra):
        return preprocess_main(["--input", *[str(src / i) for i in inputs], "--tokenizer", tok_dir,
                                "--output-prefix", prefix, "--workers", "0", "--quiet", *extra])

    assert run(["good.jsonl", "bad_line.jsonl"]) == 0  # the previous output: two shards
    before = file_digests(outdir)
    cases = [
        (["plain.jsonl.gz"], toks, [], "plain.jsonl.gz' is named .gz but is not gzip-compressed"),
        (["good.jsonl", "cut.jsonl.gz"], toks, [], "cut.jsonl.gz' is a truncated or corrupt gzip file"),
        (["empty.jsonl"], toks, [], "input '" + str(src / "empty.jsonl") + "' produced no documents"),
        (["good.jsonl"], toks, ["--json-key", "body"], "no 'body'; keys: 'text'"),
        (["cut.parquet"], toks, [], "cut.parquet' is not a readable Parquet file"),
        (["t.parquet"], toks, ["--json-key", "body"], "t.parquet' has no column 'body'"),
        (["good.jsonl"], corrupt_json, [], "tokenizer.json' cannot be loaded"),
        (["good.jsonl"], corrupt_cfg, [], "tokenizer_config.json' is not valid JSON"),
        (["good.jsonl"], bad_eos, [], "eos_token '</nope>'"),
        (["good.jsonl", "bad_line.jsonl"], toks, ["--strict"], "bad_line.jsonl:2: malformed_json"),
    ]
    for inputs, tok_dir, extra, expected in cases:
        capsys.readouterr()
        assert run(inputs, tok_dir, *extra) == 2, (inputs, extra)
        err = capsys.readouterr().err
        assert expected in err and err.startswith("error: ") and "Traceback" not in err, (expected, err)
        assert file_digests(outdir) == before, expected  # a failed re-run never mixes into the old output
        assert run_dirs(outdir) == []
    # A second live run on the same prefix is refused; the tool's own outputs are never inputs.
    from data_tools.run_output import RunOutput

    busy = RunOutput(prefix)
    assert run(["good.jsonl"]) == 2 and "another run is writing" in capsys.readouterr().err
    busy.abort()
    assert preprocess_main(["--input", prefix + ".00000.*", "--tokenizer", toks, "--output-prefix",
                            str(tmp_path / "x"), "--quiet"]) == 2
    assert "matches only outputs of the data tools" in capsys.readouterr().err
    assert file_digests(outdir) == before
    # A successful re-run with one input replaces both old shards (nothing stale stays).
    assert run(["good.jsonl"]) == 0
    assert sorted(os.listdir(outdir)) == ["ds.bin", "ds.idx", "ds.meta.json", "ds.summary.json"]
    assert read_docs(prefix) == direct(tokenizer, ["good"])


def test_tokenizer_eos_fallback_is_reported_and_text_lines_keep_newlines(tiny, tokenizer, tmp_path, capsys):
    def drop_eos(d):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("eos_token")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    no_eos = _bad_tokenizer(tiny, tmp_path, "no_eos", drop_eos)
    (tmp_path / "t.txt").write_text("first line\nsecond line\n")
    assert preprocess_main(["--input", str(tmp_path / "t.txt"), "--tokenizer", no_eos, "--output-prefix",
                            str(tmp_path / "lines"), "--text-unit", "line", "--workers", "0", "--quiet"]) == 0
    assert "using '<|endoftext|>' (id 2) as EOS" in capsys.readouterr().out
    assert read_docs(str(tmp_path / "lines")) == direct(tokenizer, ["first line\n", "second line\n"])


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_killed_worker_is_reported_within_seconds(tiny, tmp_path):
    outdir = tmp_path / "data"
    outdir.mkdir()
    proc, writer = start_fifo_run(tiny, tmp_path, str(outdir / "out"))
    workers: list = []
    wait_for(lambda: workers.extend(p for p in _children(proc.pid) if "spawn_main" in _cmdline(p))
             or workers, proc)
    os.kill(workers[0], signal.SIGKILL)
    writer.write(json.dumps({"text": "more"}) + "\n")
    writer.close()
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 20
    # the exit code is named when the pool still holds the dead process ("killed by SIGKILL")
    assert proc.returncode == 2 and "a worker process died (" in err, err
    assert "Traceback" not in err
    assert os.listdir(outdir) == []


def _write_dataset(prefix: str, docs: list) -> None:
    with IndexedWriter(prefix, np.uint16) as w:
        if docs:
            w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
        w.finalize()


def test_training_and_dry_run_share_the_data_check(tmp_path, capsys):
    from longcat_megatron.train import main as train_main

    good, other, empty, cut = (str(tmp_path / n) for n in ("good", "other", "empty", "cut"))
    _write_dataset(good, [np.array([7, 8, EOS]), np.array([9, 10, 11, 12, EOS])])
    _write_dataset(other, [np.array([7, 8, 9, 10, EOS]), np.array([11, 12, EOS])])  # same size, other bounds
    _write_dataset(empty, [])
    _write_dataset(cut, [np.array([7, 8, EOS]) for _ in range(5)])
    with open(cut + ".bin", "r+b") as f:
        f.truncate(20)
    assert "2 documents" in check_data(DataConfig(paths=[good], eod_token_id=EOS))
    # .bin files of equal size swapped, no .meta.json to compare with: caught by the EOS check.
    os.remove(good + ".meta.json")
    os.remove(other + ".meta.json")
    os.rename(good + ".bin", good + ".tmp")
    os.rename(other + ".bin", good + ".bin")
    os.rename(good + ".tmp", other + ".bin")
    expectations = [(good, "do not end with the EOS id 2"), (empty, "hold 0 documents"),
                    (cut, "do not match")]
    for prefix, expected in expectations:
        with pytest.raises(IndexedDataError, match=expected) as err:
            check_data(DataConfig(paths=[prefix], eod_token_id=EOS))
        assert prefix in str(err.value)
        capsys.readouterr()
        rc = train_main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--dry-run", "data.mock=false",
                         f"data.paths=[{prefix}]", f"data.eod_token_id={EOS}"])
        out = capsys.readouterr()
        assert rc == 2 and expected in out.err and "config OK" not in out.out, out
    assert check_data(DataConfig(paths=[good], eod_token_id=EOS, check_eod=False))  # opt-out for foreign data
    fresh = str(tmp_path / "fresh")
    _write_dataset(fresh, [np.array([7, 8, EOS])] * 3)
    assert train_main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--dry-run", "data.mock=false",
                       f"data.paths=[{fresh}]", f"data.eod_token_id={EOS}"]) == 0
    assert "data OK: 1 dataset(s), 3 documents, 9 tokens" in capsys.readouterr().out
    # Training itself refuses the empty dataset the same way (not deep inside megatron).
    from longcat_megatron.data.pretrain import build_gpt_datasets

    with pytest.raises(IndexedDataError, match="hold 0 documents"):
        build_gpt_datasets(DataConfig(paths=[empty], eod_token_id=EOS, seq_length=4), seed=1, train_samples=1,
                           eval_samples=0)
