"""Preprocessing spread over many machines: slices of the input files, one task each, then a manifest.

``python -m data_tools.preprocess ... --task-index I --num-tasks N`` (a SLURM array task of
``launch/preprocess.sh``, or any loop) tokenizes slice ``I`` of the sorted input files:
``files[I*n//N : (I+1)*n//N]`` of the ``n`` files the inputs name, a contiguous run, so the slices
in task order are the single-machine run's file order. Its outputs live under their own prefix,
``OUT.task-IIIII-of-NNNNN`` (shards ``OUT.task-IIIII-of-NNNNN.FFFFF`` with ``FFFFF`` the file's
global index, or one merged dataset with ``--merge``), written transactionally like any run
(data_tools/run_output.py): a task killed halfway leaves its previous output or none.

A task whose summary already records the same slice (the same list of all inputs, its own files
with the same sizes and modification times, the same tokenizer files and settings) is complete and
is skipped, so rerunning the whole array after a failure redoes only the tasks that failed (or
whose inputs changed).

``--finalize`` checks that every task of ``N`` is complete for the current inputs and writes
``OUT.manifest.json`` (longcat_megatron/data/manifest.py): the datasets in input order with their
counts, which ``data.paths`` accepts as ``[OUT.manifest.json]``; with ``--merge`` it first merges
them into ``OUT.bin/.idx`` (then byte-identical to a single-machine ``--merge`` run) and the
manifest names that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Optional

from longcat_megatron.data.manifest import MANIFEST_FORMAT, MANIFEST_SUFFIX
from longcat_megatron.errors import UserInputError

SLICE_FORMAT = 1
SUMMARY_SUFFIX = ".summary.json"


class SliceError(UserInputError):
    """Task index/count unusable, or tasks missing at --finalize; the message names the fix."""


def task_prefix(output_prefix: str, index: int, num_tasks: int) -> str:
    """The output prefix of task ``index`` of ``num_tasks``."""
    return f"{output_prefix}.task-{index:05d}-of-{num_tasks:05d}"


def slice_bounds(n_files: int, index: int, num_tasks: int) -> tuple[int, int]:
    """[start, end) of task ``index``'s files among ``n_files``: contiguous, sizes differ by <= 1."""
    return index * n_files // num_tasks, (index + 1) * n_files // num_tasks


def check_task(index: Optional[int], num_tasks: Optional[int]) -> None:
    if num_tasks is None and index is None:
        return
    if num_tasks is None or index is None:
        raise SliceError("--task-index and --num-tasks go together (task I of N, I from 0)")
    if num_tasks < 1 or not 0 <= index < num_tasks:
        raise SliceError(f"--task-index {index} --num-tasks {num_tasks}: need 0 <= index < num-tasks")


def check_task_count(output_prefix: str, num_tasks: int) -> None:
    """Refuse a task count other than the one the outputs already present were made with (a rerun of
    a few array ids without NUM_TASKS would otherwise start a second, partial set of slices)."""
    directory, name = os.path.split(os.path.abspath(output_prefix))
    pattern = re.compile(rf"^{re.escape(name)}\.task-\d{{5,}}-of-(\d{{5,}}){re.escape(SUMMARY_SUFFIX)}$")
    try:
        found = {int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m}
    except FileNotFoundError:
        return
    other = sorted(found - {num_tasks})
    if other:
        raise SliceError(
            f"'{output_prefix}' already holds the outputs of a {other[0]}-task split "
            f"({os.path.basename(task_prefix(output_prefix, 0, other[0]))}.* ...), not of {num_tasks} tasks. "
            f"Run with --num-tasks {other[0]} (NUM_TASKS={other[0]}: a rerun of some array ids needs it), or "
            f"delete those files ({name}.task-*-of-{other[0]:05d}*) to split the inputs anew.")


def compress_ids(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array syntax)."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def slice_outputs_matcher(output_prefix: str):
    """True for files that are outputs of a sliced run of ``output_prefix`` (any task, the manifest):
    never inputs, even when the output directory lies inside an input directory."""
    from data_tools.run_output import in_run_dir, output_file_pattern

    directory, name = os.path.split(os.path.abspath(output_prefix))
    n = re.escape(name)
    pattern = re.compile(rf"^{n}\.task-\d{{5,}}-of-\d{{5,}}(\.\d{{5,}})?\.(bin|idx|meta\.json|summary\.json|"
                         rf"skipped\.tsv)$|^{n}{re.escape(MANIFEST_SUFFIX)}(\.tmp-\d+)?$")
    single = output_file_pattern(name)  # what a run without slices writes for the same prefix

    def matches(path: str) -> bool:
        d, base = os.path.split(os.path.abspath(path))
        return in_run_dir(path) or (d == directory and bool(pattern.match(base) or single.match(base)))
    return matches


def _file_digest(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def slice_key(files: list[str], index: int, num_tasks: int, *, tokenizer: str, settings: dict) -> dict:
    """What makes a task's output valid: all inputs (paths), its own files (size, mtime), the
    tokenizer files' digests and the settings that change the tokens."""
    start, end = slice_bounds(len(files), index, num_tasks)
    own = []
    for i in range(start, end):
        st = os.stat(files[i])
        own.append({"index": i, "path": os.path.abspath(files[i]), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    listing = hashlib.sha256("\n".join(os.path.abspath(f) for f in files).encode()).hexdigest()
    return {
        "format": SLICE_FORMAT, "task_index": index, "num_tasks": num_tasks, "num_inputs": len(files),
        "inputs_digest": listing, "files": own,
        "tokenizer": {n: _file_digest(os.path.join(tokenizer, n)) for n in ("tokenizer.json", "tokenizer_config.json")},
        "settings": settings,
    }


def read_summary(prefix: str) -> Optional[dict]:
    try:
        with open(prefix + SUMMARY_SUFFIX) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def differences(saved: Optional[dict], want: dict) -> list[str]:
    """Why a task's saved slice is not ``want`` (empty: complete and current)."""
    if saved is None:
        return ["no complete output"]
    why = []
    if saved.get("inputs_digest") != want["inputs_digest"] or saved.get("num_inputs") != want["num_inputs"]:
        why.append(f"the list of input files changed ({saved.get('num_inputs')} -> {want['num_inputs']} files)")
    old = {f["index"]: f for f in saved.get("files", [])}
    for f in want["files"]:
        o = old.get(f["index"])
        if o != f:
            why.append(f"input '{f['path']}' changed" if o and o.get("path") == f["path"] else
                       f"input {f['index']} is now '{f['path']}'")
    if saved.get("tokenizer") != want["tokenizer"]:
        why.append("the tokenizer files changed")
    if saved.get("settings") != want["settings"]:
        why.append(f"settings changed ({saved.get('settings')} -> {want['settings']})")
    return why


def finalize(files: list[str], output_prefix: str, num_tasks: int, *, tokenizer: str, settings: dict,
             merge: bool = False) -> dict:
    """Check every task of ``num_tasks`` is complete for ``files``; write ``OUT.manifest.json``
    (after merging into ``OUT`` with ``merge``); returns the manifest."""
    out = os.path.abspath(output_prefix)
    check_task_count(output_prefix, num_tasks)
    problems, summaries = [], []
    for i in range(num_tasks):
        prefix = task_prefix(out, i, num_tasks)
        summary = read_summary(prefix)
        why = differences((summary or {}).get("slice"),
                          slice_key(files, i, num_tasks, tokenizer=tokenizer, settings=settings))
        if why:
            problems.append((i, why))
        summaries.append(summary)
    if problems:
        listed = "; ".join(f"task {i}: {', '.join(w)}" for i, w in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        ids = compress_ids([i for i, _ in problems])
        raise SliceError(
            f"{len(problems)} of {num_tasks} preprocessing task(s) are not complete for these inputs: "
            f"{listed}{more}. Run them (NUM_TASKS={num_tasks} sbatch --array={ids} launch/preprocess.sh, or "
            f"`python -m data_tools.preprocess ... --task-index I --num-tasks {num_tasks}`; complete tasks "
            "are skipped) and finalize again. Nothing was written.")
    datasets, documents, tokens, skipped, reasons = [], 0, 0, 0, {}
    for summary in summaries:
        for shard in summary["shards"]:
            prefix = shard.get("merged_into") or shard["prefix"]
            if not datasets or datasets[-1]["abs"] != prefix:
                datasets.append({"abs": prefix, "documents": 0, "tokens": 0, "inputs": []})
            datasets[-1]["documents"] += shard["documents"]
            datasets[-1]["tokens"] += shard["tokens"]
            datasets[-1]["inputs"].append(shard["input"])
        documents += summary["documents"]
        tokens += summary["tokens"]
        skipped += summary["skipped"]
        for code, entry in summary["skipped_by_reason"].items():
            merged = reasons.setdefault(code, {"count": 0, "meaning": entry["meaning"], "examples": []})
            merged["count"] += entry["count"]
            merged["examples"] = (merged["examples"] + entry["examples"])[:5]
    if not datasets:
        raise SliceError(f"the {num_tasks} tasks of '{output_prefix}' wrote no dataset (no input files?)")
    base = os.path.dirname(out)
    from longcat_megatron.data.indexed_files import check_indexed_pair

    for d in datasets:
        check_indexed_pair(d["abs"])  # present, sizes consistent (a task's files deleted since?)
    if merge:
        from data_tools.merge import merge_into

        merge_into([d["abs"] for d in datasets], out)
        datasets = [{"abs": out, "documents": documents, "tokens": tokens,
                     "inputs": [i for d in datasets for i in d["inputs"]]}]
    manifest = {
        "format": MANIFEST_FORMAT,
        "datasets": [{"prefix": os.path.relpath(d["abs"], base), "documents": d["documents"],
                      "tokens": d["tokens"], "inputs": d["inputs"]} for d in datasets],
        "documents": documents, "tokens": tokens, "skipped": skipped, "skipped_by_reason": reasons,
        "num_tasks": num_tasks, "num_inputs": len(files), "merged": merge,
        "tokenizer": os.path.abspath(tokenizer), "settings": settings,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out + MANIFEST_SUFFIX
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest
