"""Tokenize JSONL / Parquet / plain-text corpora into megatron-core indexed datasets.

Example::

    python -m data_tools.preprocess --input 'corpus/*.jsonl' --tokenizer TOKDIR \\
        --output-prefix data/corpus --workers 8

Every input file is one shard and gets its own ``.bin/.idx`` pair (``OUT.bin`` for a single input,
``OUT.00000.bin``, ``OUT.00001.bin``, ... for several; ``--merge`` joins them into ``OUT``, or run
``python -m data_tools.merge`` later). Each document is tokenized without the tokenizer's own special
tokens and ends with EOS (``--bos`` also prepends BOS). Files are streamed in ~1 MiB chunks through
``--workers`` processes with a bounded number of chunks in flight, so memory does not grow with the
corpus. Bad records (invalid UTF-8, malformed JSON, missing key, empty document, ...) are skipped and
counted by reason, with ``file:line`` examples in the summary and every one in PREFIX.skipped.tsv;
``--strict`` stops at the first one instead. A bad file (truncated gzip, unreadable Parquet, no
usable record at all) stops the run with an error naming it. Outputs of one run appear together, only
when all are complete; a failed or interrupted run leaves the previous output as it was. Exit codes:
0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM.

Over many machines (``launch/preprocess.sh``, a SLURM job array): ``--task-index I --num-tasks N``
tokenizes slice I of the sorted input files into ``OUT.task-IIIII-of-NNNNN*`` (skipped when already
complete for the same inputs and settings), and ``--finalize --num-tasks N`` writes
``OUT.manifest.json`` for ``data.paths`` (``--merge``: one ``OUT.bin/.idx``); see data_tools/slices.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from data_tools.cli_common import Progress, run_tool
from data_tools.indexed_writer import IndexedWriter, token_dtype
from data_tools.ordered_pool import OrderedPool
from data_tools.run_output import RunOutput
from data_tools.slices import (
    check_task, check_task_count, differences, read_summary, slice_bounds, slice_key, slice_outputs_matcher, task_prefix,
)
from data_tools.sources import FORMATS, expand_inputs, input_size, iter_chunks
from data_tools.tokenize_worker import init_worker, tokenize_chunk
from data_tools.validation import SkipLog, StrictStop, empty_output_error, location
from longcat_megatron.data.tokenizer import TokenizerDirError, load_tokenizer, tokenizer_info

PreprocessError = StrictStop  # the error ``--strict`` raises (kept name)
SUMMARY_SUFFIX = ".summary.json"
REASONS_SUFFIX = ".skipped.tsv"


@dataclass
class PreprocessSummary:
    """What a preprocessing run did (also written as ``PREFIX.summary.json``)."""

    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)  # code -> {count, meaning, examples}
    reasons_file: Optional[str] = None  # every skipped record: file:line<TAB>code<TAB>detail
    shards: list = field(default_factory=list)  # {"input", "prefix", "documents", "tokens", ...}
    excluded_inputs: list = field(default_factory=list)  # outputs of the data tools met in --input
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    input_bytes: int = 0
    slice: Optional[dict] = None  # --task-index/--num-tasks: what this task's output was made from
    reused: bool = False  # (not written) the task was already complete: nothing was done

    @classmethod
    def from_json(cls, data: dict) -> "PreprocessSummary":
        names = {f for f in cls.__dataclass_fields__ if f != "reused"}
        return cls(**{k: v for k, v in data.items() if k in names})

    def take_skips(self, skips: SkipLog, reasons_file: str) -> None:
        self.skipped, self.skipped_by_reason = skips.total, skips.to_json()
        self.reasons_file = reasons_file if skips.total else None

    def write_json(self, path: str) -> None:
        data = asdict(self)
        data.pop("reused")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = []
        if self.slice is not None:
            s = self.slice
            start, end = slice_bounds(s["num_inputs"], s["task_index"], s["num_tasks"])
            what = f"input files {start}..{end - 1}" if end > start else "no input file (more tasks than files)"
            lines.append(f"task {s['task_index']} of {s['num_tasks']}: {what} of {s['num_inputs']}"
                         + ("; already complete for these inputs and settings: skipped (nothing done)"
                            if self.reused else ""))
        lines += [f"documents: {self.documents:,}  tokens: {self.tokens:,} (EOS included)  "
                 f"skipped records: {self.skipped:,}  time: {self.seconds:.1f}s  tokens/s: {rate:,.0f}"]
        lines += format_details(self)
        for shard in self.shards:
            lines.append(f"  {shard['input']} -> {shard['prefix']}.bin/.idx "
                         f"({shard['documents']:,} documents, {shard['tokens']:,} tokens)")
        return "\n".join(lines)


def format_details(summary) -> list[str]:
    """Skip reasons with examples, excluded inputs and notes (shared by both tools' summaries)."""
    lines = []
    for code, entry in summary.skipped_by_reason.items():
        lines.append(f"  skipped {entry['count']:,} x {code}: {entry['meaning']}")
        lines += [f"      {e}" for e in entry["examples"]]
        if entry["count"] > len(entry["examples"]):
            lines.append(f"      ... all {entry['count']:,} listed in {summary.reasons_file}")
    if summary.excluded_inputs:
        lines.append(f"  left out {len(summary.excluded_inputs)} input file(s) that are outputs of the data "
                     f"tools, e.g. {summary.excluded_inputs[0]}")
    lines += [f"  note: {n}" for n in summary.notes]
    return lines


def shard_prefixes(output_prefix: str, n_inputs: int) -> list[str]:
    """Output prefix of each input shard."""
    if n_inputs == 1:
        return [output_prefix]
    return [f"{output_prefix}.{i:05d}" for i in range(n_inputs)]


def preprocess(
    inputs: list[str],
    tokenizer: str,
    output_prefix: str,
    *,
    json_key: str = "text",
    input_format: str = "auto",
    text_unit: str = "file",
    workers: int = 1,
    threads_per_worker: int = 1,
    strict: bool = False,
    add_bos: bool = False,
    merge: bool = False,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    task_index: Optional[int] = None,
    num_tasks: Optional[int] = None,
) -> PreprocessSummary:
    """Tokenize ``inputs`` (paths/globs/dirs) into indexed datasets; returns the summary.

    All outputs appear together when the run succeeds (see :mod:`data_tools.run_output`); any error
    leaves the previous output of ``output_prefix`` as it was. With ``task_index``/``num_tasks`` only
    that task's slice of the files is tokenized, into ``task_prefix(output_prefix, ...)``, unless
    that task is already complete (:mod:`data_tools.slices`).
    """
    check_task(task_index, num_tasks)
    info = tokenizer_info(tokenizer, load_tokenizer(tokenizer))
    if add_bos and info.bos_id is None:
        raise TokenizerDirError(f"--bos: tokenizer '{tokenizer}' has no bos_token (in its vocabulary)")
    dtype = token_dtype(info.vocab_size)
    sliced = num_tasks is not None
    if sliced:
        check_task_count(output_prefix, num_tasks)
    is_output = slice_outputs_matcher(output_prefix)
    with RunOutput(task_prefix(output_prefix, task_index, num_tasks) if sliced else output_prefix) as out:
        summary = PreprocessSummary(notes=[info.eos_note] if info.eos_note else [])
        files = expand_inputs(inputs, summary.excluded_inputs, lambda p: out.owns(p) or is_output(p))
        if sliced:
            key = slice_key(files, task_index, num_tasks, tokenizer=tokenizer,
                            settings=slice_settings(info, json_key, input_format, text_unit, add_bos))
            previous = read_summary(out.final_prefix)
            if previous is not None and not differences(previous.get("slice"), key):
                out.abort()  # complete for these inputs: a rerun of the array redoes only what failed
                done = PreprocessSummary.from_json(previous)
                done.reused = True
                return done
            start, end = slice_bounds(len(files), task_index, num_tasks)
            prefixes = [f"{out.prefix}.{i:05d}" for i in range(start, end)]
            files = files[start:end]
            summary.slice = key
        else:
            prefixes = shard_prefixes(out.prefix, len(files))
        summary.input_bytes = sum(input_size(f) or 0 for f in files)
        skips = SkipLog(out.prefix + REASONS_SUFFIX, strict)
        start = time.monotonic()
        bar = Progress(progress, summary.input_bytes, "preprocess")
        pool = OrderedPool(workers, init_worker, (tokenizer, json_key, info.eos_id,
                                                  info.bos_id if add_bos else None, threads_per_worker, dtype.name))
        try:
            for path, prefix in zip(files, prefixes):
                file_skips = SkipLog(None)
                with IndexedWriter(prefix, dtype) as writer:
                    chunks = iter_chunks(path, input_format, json_key=json_key, text_unit=text_unit,
                                         chunk_bytes=chunk_bytes)
                    for result in pool.map(tokenize_chunk, chunks, window=4 * max(1, workers)):
                        for loc, code, detail in result.skipped:
                            skips.add(location(path, loc), code, detail)
                            file_skips.add(location(path, loc), code, detail)
                        writer.add_documents(result.ids, result.lengths)
                        bar.update(result.nbytes, docs=summary.documents + writer.documents,
                                   tokens=summary.tokens + writer.tokens)
                    if writer.documents == 0:
                        raise empty_output_error(f"input '{path}'", file_skips, _empty_hint(json_key))
                    counts = writer.finalize({"input": os.path.abspath(path),
                                              "tokenizer": os.path.abspath(tokenizer)})
                summary.documents += counts["documents"]
                summary.tokens += counts["tokens"]
                summary.shards.append({"input": path, "prefix": out.final(prefix), **counts})
        finally:
            pool.close()
            bar.close()
            skips.close()
        if merge and len(prefixes) > 1:
            from data_tools.merge import merge_datasets

            merge_datasets(prefixes, out.prefix, remove_inputs=True)
            summary.shards = [{**s, "merged_into": out.final_prefix} for s in summary.shards]
        summary.take_skips(skips, out.final_prefix + REASONS_SUFFIX)
        if not skips.total:
            os.remove(out.prefix + REASONS_SUFFIX)
        summary.seconds = time.monotonic() - start
        summary.write_json(out.prefix + SUMMARY_SUFFIX)
        out.commit()
    return summary


def slice_settings(info, json_key: str, input_format: str, text_unit: str, add_bos: bool) -> dict:
    """The settings that change the tokens a task writes (recorded with its slice)."""
    return {"json_key": json_key, "input_format": input_format, "text_unit": text_unit, "bos": add_bos,
            "eos_id": info.eos_id, "vocab_size": info.vocab_size}


def finalize_slices(inputs: list[str], tokenizer: str, output_prefix: str, num_tasks: int, *,
                    json_key: str = "text", input_format: str = "auto", text_unit: str = "file",
                    add_bos: bool = False, merge: bool = False) -> dict:
    """``--finalize``: check the ``num_tasks`` tasks and write ``OUT.manifest.json``; returns it."""
    from data_tools.slices import finalize

    check_task(0, num_tasks)
    info = tokenizer_info(tokenizer, load_tokenizer(tokenizer))
    files = expand_inputs(inputs, [], slice_outputs_matcher(output_prefix))
    return finalize(files, output_prefix, num_tasks, tokenizer=tokenizer, merge=merge,
                    settings=slice_settings(info, json_key, input_format, text_unit, add_bos))


def format_manifest(manifest: dict, output_prefix: str) -> str:
    from longcat_megatron.data.manifest import MANIFEST_SUFFIX

    path = os.path.abspath(output_prefix) + MANIFEST_SUFFIX
    lines = [f"manifest: {path}: {len(manifest['datasets'])} dataset(s) from {manifest['num_inputs']} input "
             f"file(s) of {manifest['num_tasks']} task(s); documents: {manifest['documents']:,}  tokens: "
             f"{manifest['tokens']:,}  skipped records: {manifest['skipped']:,}"]
    if manifest["merged"]:
        lines.append(f"  merged into {os.path.abspath(output_prefix)}.bin/.idx")
    lines.append(f"  train on it with data.paths=[{path}]")
    return "\n".join(lines)


def _empty_hint(json_key: str) -> str:
    return (f"Check --json-key (now '{json_key}'; the missing_key examples list the keys found), "
            "--input-format, or remove the file from --input.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.preprocess",
        description=__doc__.split("Example::")[0].strip(),
        epilog=__doc__.split("Example::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="input files, globs ('data/**/*.jsonl') or directories")
    parser.add_argument("--tokenizer", required=True,
                        help="local Hugging Face tokenizer directory holding tokenizer.json (offline)")
    parser.add_argument("--output-prefix", required=True,
                        help="output PREFIX: writes PREFIX.bin/.idx (PREFIX.NNNNN.* for several inputs), "
                             "PREFIX.meta.json and PREFIX.summary.json")
    parser.add_argument("--json-key", default="text", help="JSONL key / Parquet column with the text (default: text)")
    parser.add_argument("--input-format", choices=FORMATS, default="auto",
                        help="auto: by extension (.jsonl/.json[.gz], .parquet, else text)")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file",
                        help="plain text: one document per file (default) or per line; with 'line' each "
                             "document keeps its line's trailing newline, exactly as in the file")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer worker processes (default: CPU cores - 1; 0 = tokenize in this process)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="tokenizer threads inside each worker (default 1)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record, naming file:line, instead of skipping it")
    parser.add_argument("--bos", action="store_true", help="also prepend the tokenizer's BOS to each document")
    parser.add_argument("--merge", action="store_true",
                        help="with several inputs, merge the shards into PREFIX.bin/.idx at the end (a task: "
                             "into its PREFIX.task-IIIII-of-NNNNN; --finalize: everything into PREFIX)")
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="input bytes per worker task (default 1)")
    parser.add_argument("--task-index", type=int, default=None,
                        help="with --num-tasks: tokenize only slice I (from 0) of the sorted input files, into "
                             "PREFIX.task-IIIII-of-NNNNN*; skipped when already complete (a SLURM array task)")
    parser.add_argument("--num-tasks", type=int, default=None, help="how many tasks share the input files")
    parser.add_argument("--finalize", action="store_true",
                        help="with --num-tasks: check that every task is complete and write PREFIX.manifest.json "
                             "for data.paths (with --merge: merge all into PREFIX.bin/.idx first)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.finalize:
        if args.num_tasks is None:
            print("error: --finalize needs --num-tasks N (the number of tasks of the array)", file=sys.stderr)
            return 2
        return run_tool(lambda: format_manifest(finalize_slices(
            args.input, args.tokenizer, args.output_prefix, args.num_tasks, json_key=args.json_key,
            input_format=args.input_format, text_unit=args.text_unit, add_bos=args.bos, merge=args.merge),
            args.output_prefix))
    return run_tool(lambda: preprocess(
        args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
        input_format=args.input_format, text_unit=args.text_unit, workers=args.workers,
        threads_per_worker=args.threads_per_worker, strict=args.strict, add_bos=args.bos,
        merge=args.merge, chunk_bytes=int(args.chunk_mb * (1 << 20)), progress=not args.quiet,
        task_index=args.task_index, num_tasks=args.num_tasks,
    ).format())


if __name__ == "__main__":
    sys.exit(main())
