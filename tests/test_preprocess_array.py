"""Preprocessing over many machines (data_tools/slices.py, launch/preprocess.sh).

* Without SLURM (--task-index/--num-tasks, in this process): the slices cover the sorted inputs in
  order; a complete task is skipped, a changed input redoes only its task; --finalize refuses while a
  task is missing and names it, refuses another task count; the manifest works as data.paths
  (weighted too) and passes the training data check; outputs inside the input directory are never
  read as inputs.
* On the local SLURM cluster: ``launch/preprocess.sh --submit`` (an array of 3 + the dependent final
  step) with a corrupt file in task 1's slice: task 1 fails, the others complete, the final step never
  runs; after the file is fixed, the same array again redoes only task 1; the final step as a command
  then writes a manifest whose datasets, and the merged dataset, are token-identical (byte-identical
  .bin/.idx) to a single-machine run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from tests.slurm.cluster import ROOT, slurm_cluster  # noqa: F401 (fixture)

N_FILES = 7


def write_corpus(directory, tiny: str, broken: int | None = None, only: int | None = None) -> list[str]:
    """N_FILES inputs (file 3 gzip) cut from the tiny corpus; ``broken=3``: file 3 a corrupt gzip
    file; ``only``: (re)write that file only. Returns the documents in file order."""
    docs = [json.loads(line)["text"] for line in open(os.path.join(tiny, "corpus.jsonl"))][:70]
    os.makedirs(directory, exist_ok=True)
    per = len(docs) // N_FILES
    for i in range(N_FILES) if only is None else [only]:
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs[i * per:(i + 1) * per]).encode()
        if i == 3:
            path = os.path.join(directory, f"part{i}.jsonl.gz")
            data = gzip.compress(body)
            open(path, "wb").write(data[: len(data) // 2] if i == broken else data)
        else:
            open(os.path.join(directory, f"part{i}.jsonl"), "wb").write(body)
    return docs[: per * N_FILES]


def single_machine(corpus, tokenizer: str, out: str) -> str:
    from data_tools.preprocess import preprocess

    preprocess([str(corpus)], tokenizer, out, workers=0, merge=True, progress=False)
    return out


def dataset_tokens(prefixes: list[str]) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def same_bytes(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def test_slices_skip_finalize_and_manifest(tiny, tmp_path):
    from data_tools.preprocess import finalize_slices, preprocess
    from data_tools.slices import SliceError, slice_bounds
    from longcat_megatron.data.check import check_data
    from longcat_megatron.data.config import DataConfig
    from longcat_megatron.errors import UserInputError

    assert [slice_bounds(7, i, 3) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [slice_bounds(2, i, 3) for i in range(3)] == [(0, 0), (0, 1), (1, 2)]  # a task may get none
    tok = os.path.join(tiny, "tokenizer")
    corpus = tmp_path / "corpus"
    write_corpus(corpus, tiny)
    out = str(corpus / "prep" / "web")  # outputs inside the input directory: never inputs
    ref = single_machine(corpus, tok, str(tmp_path / "ref" / "web"))

    def task(i, n=3):
        return preprocess([str(corpus)], tok, out, workers=0, progress=False, task_index=i, num_tasks=n)

    first = [task(i) for i in range(3)]
    assert [len(s.shards) for s in first] == [2, 2, 3] and not any(s.reused for s in first)
    assert "task 2 of 3: input files 4..6 of 7" in first[2].format()
    with pytest.raises(SliceError, match="not of 2 tasks"):
        task(0, n=2)
    stamp = os.path.getmtime(out + ".task-00000-of-00003.summary.json")
    again = task(0)
    assert again.reused and "already complete" in again.format()
    assert os.path.getmtime(out + ".task-00000-of-00003.summary.json") == stamp
    # a changed input file redoes its own task only
    os.utime(corpus / "part5.jsonl", ns=(1, 1))
    assert task(2).reused is False and task(1).reused is True

    os.remove(out + ".task-00001-of-00003.summary.json")
    with pytest.raises(SliceError, match=r"1 of 3 preprocessing task\(s\) are not complete.*task 1: no complete "
                                         r"output.*--array=1 "):
        finalize_slices([str(corpus)], tok, out, 3)
    assert task(1).reused is False
    manifest = finalize_slices([str(corpus)], tok, out, 3)
    assert [d["prefix"] for d in manifest["datasets"]] == [f"web.task-{t:05d}-of-00003.{f:05d}"
                                                            for f, t in enumerate([0, 0, 1, 1, 2, 2, 2])]
    path = out + ".manifest.json"
    assert dataset_tokens(DataConfig(paths=[path]).prefixes()) == dataset_tokens([ref])
    cfg = DataConfig(paths=[path], tokenizer=tok)
    cfg.validate()
    assert "data OK: 7 dataset(s)" in check_data(cfg)
    weighted = DataConfig(paths=[0.75, path, 0.25, ref]).weights()
    assert len(weighted) == 8 and abs(sum(weighted[:7]) - 0.75) < 1e-9 and weighted[7] == 0.25
    tokens = [d["tokens"] for d in manifest["datasets"]]
    assert np.allclose(weighted[:7], [0.75 * t / sum(tokens) for t in tokens])
    with pytest.raises(UserInputError, match="does not exist"):
        DataConfig(paths=[str(tmp_path / "none.manifest.json")]).prefixes()


def _array_states(job_id: str, env: dict) -> dict:
    """{task id: (JobState, ExitCode)} of an array job once none of its tasks is pending/running."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                             text=True).stdout
        tasks = {}
        for line in out.splitlines():
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            tasks[f.get("ArrayTaskId", "-")] = (f.get("JobState"), f.get("ExitCode"))
        if tasks and not any(s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s, _ in tasks.values()):
            return tasks
        time.sleep(0.3)
    raise AssertionError(f"array job {job_id} not finished: {out}")


def test_slurm_array_fails_one_task_reruns_it_and_matches_single_machine(tiny, tmp_path, slurm_cluster):  # noqa: F811
    tok = os.path.join(tiny, "tokenizer")
    corpus = tmp_path / "corpus"
    write_corpus(corpus, tiny, broken=3)  # part3.jsonl.gz is file 3: task 1's slice (files 2..3)
    out = str(tmp_path / "data" / "web")
    env = dict(slurm_cluster, LONGCAT_ROOT=ROOT, INPUTS=str(corpus), TOKENIZER=tok,
               OUTPUT_PREFIX=out, WORKERS="1", SBATCH_ARGS="--oversubscribe --cpus-per-task=1 --time=10")
    env.pop("VIRTUAL_ENV", None)
    sub = subprocess.run(["bash", os.path.join(ROOT, "launch/preprocess.sh"), "--submit"],
                         env=dict(env, NUM_TASKS="3"), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    array = re.search(r"^array (\d+)$", sub.stdout, re.M).group(1)
    final = re.search(r"^finalize (\d+)$", sub.stdout, re.M).group(1)
    states = _array_states(array, env)
    logs = {i: (tmp_path / f"longcat-preprocess-{array}_{i}.log").read_text() for i in range(3)}
    assert states["0"][0] == "COMPLETED" and states["2"][0] == "COMPLETED", (states, logs)
    assert states["1"] == ("FAILED", "2:0"), (states, logs[1])
    assert "part3.jsonl.gz' is a truncated or corrupt gzip file" in logs[1]
    assert _array_states(final, env)["-"][0] == "CANCELLED"  # afterok never satisfied: no manifest
    assert not os.path.exists(out + ".manifest.json")
    done = {i: os.path.getmtime(f"{out}.task-0000{i}-of-00003.summary.json") for i in (0, 2)}

    write_corpus(corpus, tiny, only=3)  # the file fixed; rerun the same array (NUM_TASKS from its size)
    rerun = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--oversubscribe", "--cpus-per-task=1",
                            os.path.join(ROOT, "launch/preprocess.sh")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    array2 = rerun.stdout.strip().split(";")[0]
    states = _array_states(array2, env)
    logs = {i: (tmp_path / f"longcat-preprocess-{array2}_{i}.log").read_text() for i in range(3)}
    assert all(s == ("COMPLETED", "0:0") for s in states.values()), (states, logs)
    for i in (0, 2):
        assert "already complete for these inputs and settings: skipped" in logs[i], logs[i]
        assert os.path.getmtime(f"{out}.task-0000{i}-of-00003.summary.json") == done[i]
    assert "task 1 of 3: input files 2..3 of 7\n" in logs[1]

    fin = subprocess.run(["bash", os.path.join(ROOT, "launch/preprocess.sh"), "--finalize"],
                         env=dict(env, NUM_TASKS="3", MERGE="1"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert fin.returncode == 0, fin.stdout + fin.stderr
    manifest = json.load(open(out + ".manifest.json"))
    ref = single_machine(corpus, tok, str(tmp_path / "ref" / "web"))
    assert manifest["datasets"][0]["prefix"] == "web" and manifest["merged"]
    assert same_bytes(out, ref)  # merged: byte-identical to the single-machine --merge run
    shards = sorted(p[:-4] for p in os.listdir(tmp_path / "data") if re.match(r"web\.task-.*\.\d{5}\.idx$", p))
    assert len(shards) == N_FILES
    assert dataset_tokens([str(tmp_path / "data" / s) for s in shards]) == dataset_tokens([ref])
