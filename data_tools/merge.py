"""Merge several indexed datasets (``.bin/.idx`` pairs of one token dtype) into one.

Example::

    python -m data_tools.merge --inputs 'data/corpus.*.idx' --output-prefix data/corpus

Inputs are prefixes, or globs of ``.idx``/``.bin`` files (the extension is dropped); they are merged
in sorted order. Each pair is checked first (a truncated or mismatched pair is an error). The output
is transactional like ``data_tools.preprocess``'s (``data_tools/run_output.py``): written into a
private run directory, and the files of the prefix replaced together only when complete; an
interrupted or failed merge leaves the previous output as it was. A merge replaces ``OUT.bin``,
``.idx`` and ``.meta.json`` only: shards named like the output's (``OUT.00000`` merged into
``OUT``) are kept, inputs or not, and inputs go only with ``--remove-inputs``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Optional

import numpy as np

from data_tools.indexed_writer import IndexedWriter
from data_tools.run_output import RunOutput
from longcat_megatron.data.indexed_files import (
    SIDECAR_SUFFIX, IndexedDataError, check_indexed_pair,
)
from longcat_megatron.errors import UserInputError

_CHUNK = 1 << 22


def _lengths(prefix: str, sequences: int):
    mm = np.memmap(prefix + ".idx", mode="r", dtype=np.int32, offset=34, shape=(sequences,))
    for s in range(0, sequences, _CHUNK):
        yield np.array(mm[s : s + _CHUNK])
    del mm


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Dataset prefixes named by prefixes or globs of .bin/.idx files, sorted and de-duplicated."""
    prefixes: list[str] = []
    for pattern in patterns:
        matches = glob.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        found = sorted({m[:-4] if m.endswith((".bin", ".idx")) else m for m in matches})
        if not found:
            raise IndexedDataError(f"--inputs '{pattern}' matches no dataset")
        prefixes.extend(p for p in found if p not in prefixes)
    return prefixes


def merge_into(prefixes: list[str], output_prefix: str, *, remove_inputs: bool = False) -> dict:
    """:func:`merge_datasets` as one transaction on ``output_prefix`` (what the CLI runs)."""
    _check_not_an_input(output_prefix, prefixes)
    with RunOutput(output_prefix) as out:
        counts = merge_datasets(prefixes, out.prefix)
        # Only OUT.bin/.idx/.meta.json are replaced; shards OUT.NNNNN (inputs or not) are data.
        out.commit(keep=[p for p in out.previous_outputs() if p not in _pair_files(out.final_prefix)])
    if remove_inputs:
        _remove_pairs(prefixes)
    return counts


def merge_datasets(prefixes: list[str], output_prefix: str, *, remove_inputs: bool = False) -> dict:
    """Concatenate datasets in the given order into ``output_prefix``; returns docs/tokens counts
    (writes in place: callers that need a transaction use :func:`merge_into` or their own
    ``RunOutput``, as preprocess ``--merge`` does)."""
    summaries = [check_indexed_pair(p) for p in prefixes]
    dtypes = {s["dtype"] for s in summaries}
    if len(dtypes) != 1:
        raise IndexedDataError(f"cannot merge datasets of different token dtypes {sorted(dtypes)}: {prefixes}")
    if any(s["documents"] != s["sequences"] for s in summaries):
        raise IndexedDataError("merge supports one sequence per document (as data_tools.preprocess writes)")
    _check_not_an_input(output_prefix, prefixes)
    with IndexedWriter(output_prefix, np.dtype(dtypes.pop())) as writer:
        for prefix, summary in zip(prefixes, summaries):
            writer.append_raw(prefix + ".bin", _lengths(prefix, summary["sequences"]))
        counts = writer.finalize({"merged_from": [os.path.abspath(p) for p in prefixes]})
    if remove_inputs:
        _remove_pairs(prefixes)
    return counts


def _pair_files(prefix: str) -> list[str]:
    """The files of one indexed dataset: ``.bin``, ``.idx`` and the sidecar."""
    return [prefix + ext for ext in (".bin", ".idx", SIDECAR_SUFFIX)]


def _check_not_an_input(output_prefix: str, prefixes: list[str]) -> None:
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise IndexedDataError(f"--output-prefix '{output_prefix}' is also an input")


def _remove_pairs(prefixes: list[str]) -> None:
    for path in (f for prefix in prefixes for f in _pair_files(prefix)):
        if os.path.exists(path):
            os.remove(path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.merge", description=__doc__.split("Example::")[0].strip(),
        epilog=__doc__.split("Example::")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes or globs of .idx files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    parser.add_argument("--remove-inputs", action="store_true", help="delete the inputs after a successful merge")
    args = parser.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.inputs)
        counts = merge_into(prefixes, args.output_prefix, remove_inputs=args.remove_inputs)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx: "
          f"{counts['documents']:,} documents, {counts['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
