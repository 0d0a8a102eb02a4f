"""Tokenize JSONL / Parquet / plain-text corpora into megatron-core indexed datasets.

Example::

    python -m data_tools.preprocess --input 'corpus/*.jsonl' --tokenizer TOKDIR \\
        --output-prefix data/corpus --workers 8

Every input file is one shard and gets its own ``.bin/.idx`` pair (``OUT.bin`` for a single input,
``OUT.00000.bin``, ``OUT.00001.bin``, ... for several; ``--merge`` joins them into ``OUT``, or run
``python -m data_tools.merge`` later). Each document is tokenized without the tokenizer's own special
tokens and ends with EOS (``--bos`` also prepends BOS). Files are streamed in ~1 MiB chunks through
``--workers`` processes with a bounded number of chunks in flight, so memory does not grow with the
corpus. Bad records (invalid UTF-8, malformed JSON, missing key, empty document, unreadable Parquet)
are skipped and counted with ``file:line`` in the summary; ``--strict`` stops at the first one
instead. Outputs are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from data_tools.indexed_writer import IndexedWriter, token_dtype
from data_tools.ordered_pool import make_pool, ordered_map
from data_tools.sources import FORMATS, expand_inputs, input_size, iter_chunks
from data_tools.tokenize_worker import init_worker, tokenize_chunk
from longcat_megatron.data.tokenizer import TokenizerDirError, load_tokenizer, tokenizer_info
from longcat_megatron.errors import UserInputError

MAX_LISTED_SKIPS = 1000


class PreprocessError(UserInputError):
    """Preprocessing stopped (``--strict`` on a bad record); the message names ``file:line``."""


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    skipped_count: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # "file:line: reason", first MAX_LISTED_SKIPS
    shards: list = field(default_factory=list)  # {"input", "prefix", "documents", "tokens"}
    seconds: float = 0.0
    input_bytes: int = 0

    def record_skip(self, where: str, reason: str, strict: bool) -> None:
        """Count a skipped record, or raise :class:`PreprocessError` naming it under ``--strict``."""
        if strict:
            raise PreprocessError(f"{where}: {reason} (stopped by --strict)")
        self.skipped_count += 1
        key = _reason_class(reason)
        self.skipped_by_reason[key] = self.skipped_by_reason.get(key, 0) + 1
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append(f"{where}: {reason}")

    def write_json(self, path: str) -> None:
        """Write the summary (atomically) as JSON."""
        with open(path + ".tmp", "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(path + ".tmp", path)

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"documents: {self.documents:,}  tokens: {self.tokens:,} (EOS included)  "
            f"skipped: {self.skipped_count:,}  time: {self.seconds:.1f}s  tokens/s: {rate:,.0f}",
        ]
        for reason, n in sorted(self.skipped_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:,} x {reason}")
        for item in self.skipped[:20]:
            lines.append(f"    {item}")
        if self.skipped_count > 20:
            lines.append(f"    ... all listed (up to {MAX_LISTED_SKIPS}) in the summary JSON")
        for shard in self.shards:
            lines.append(f"  {shard['input']} -> {shard['prefix']}.bin/.idx "
                         f"({shard['documents']:,} docs, {shard['tokens']:,} tokens)")
        return "\n".join(lines)


def location(path: str, loc) -> str:
    """``file:line`` (or ``file:row N``, or just ``file`` for a whole-file problem)."""
    return path if loc == "file" else f"{path}:{loc}"


def _reason_class(reason: str) -> str:
    """Group reasons for the summary (drop the per-record detail in parentheses/positions)."""
    return reason.split(" (")[0].split(" at byte")[0]


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
) -> PreprocessSummary:
    """Tokenize ``inputs`` (paths/globs/dirs) into indexed datasets; returns the summary."""
    files = expand_inputs(inputs)
    info = tokenizer_info(tokenizer, load_tokenizer(tokenizer))
    if add_bos and info.bos_id is None:
        raise TokenizerDirError(f"--bos: tokenizer '{tokenizer}' has no bos_token")
    dtype = token_dtype(info.vocab_size)
    prefixes = shard_prefixes(output_prefix, len(files))
    summary = PreprocessSummary(input_bytes=sum(input_size(f) or 0 for f in files))
    start = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=summary.input_bytes or None, unit="B", unit_scale=True, desc="preprocess",
                   file=sys.stderr, dynamic_ncols=True)
    pool = make_pool(workers, init_worker, (tokenizer, json_key, info.eos_id, info.bos_id if add_bos else None,
                                            threads_per_worker, dtype.name))
    try:
        for path, prefix in zip(files, prefixes):
            with IndexedWriter(prefix, dtype) as writer:
                chunks = iter_chunks(path, input_format, json_key=json_key, text_unit=text_unit,
                                     chunk_bytes=chunk_bytes)
                for result in ordered_map(pool, tokenize_chunk, chunks, window=4 * max(1, workers)):
                    for loc, reason in result.skipped:
                        summary.record_skip(location(path, loc), reason, strict)
                    writer.add_documents(result.ids, result.lengths)
                    if bar is not None:
                        elapsed = max(time.monotonic() - start, 1e-9)
                        bar.update(result.nbytes)
                        bar.set_postfix_str(
                            f"docs/s={(summary.documents + writer.documents) / elapsed:,.0f} "
                            f"tokens/s={(summary.tokens + writer.tokens) / elapsed:,.0f}"
                        )
                counts = writer.finalize({"input": os.path.abspath(path), "tokenizer": os.path.abspath(tokenizer)})
            summary.documents += counts["documents"]
            summary.tokens += counts["tokens"]
            summary.shards.append({"input": path, "prefix": prefix, **counts})
    finally:
        pool.terminate()
        pool.join()
        if bar is not None:
            bar.close()
    if merge and len(prefixes) > 1:
        from data_tools.merge import merge_datasets

        merge_datasets(prefixes, output_prefix, remove_inputs=True)
        summary.shards = [{**s, "merged_into": output_prefix} for s in summary.shards]
    summary.seconds = time.monotonic() - start
    summary.write_json(output_prefix + ".summary.json")
    return summary


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
                        help="plain text: one document per file (default) or per line")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer worker processes (default: CPU cores - 1)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="tokenizer threads inside each worker (default 1)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad record, naming file:line, instead of skipping it")
    parser.add_argument("--bos", action="store_true", help="also prepend the tokenizer's BOS to each document")
    parser.add_argument("--merge", action="store_true",
                        help="with several inputs, merge the shards into PREFIX.bin/.idx at the end")
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="input bytes per worker task (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(
            args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
            input_format=args.input_format, text_unit=args.text_unit, workers=args.workers,
            threads_per_worker=args.threads_per_worker, strict=args.strict, add_bos=args.bos,
            merge=args.merge, chunk_bytes=int(args.chunk_mb * (1 << 20)), progress=not args.quiet,
        )
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was completed for the current shard", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
