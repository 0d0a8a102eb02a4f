"""Input files for preprocessing, read as a stream of small chunks of raw records.

Formats: JSONL (``.jsonl``/``.json``, optionally ``.gz``), Parquet (``.parquet``) and plain text
(anything else, optionally ``.gz``; one document per file or per line). Reading never decodes or
parses JSON: that happens in the worker processes (:mod:`data_tools.tokenize_worker`), so a bad line
costs the reader nothing and is reported with its location there. A UTF-8 byte-order mark at the
start of a file is dropped. A file that cannot be read as a whole (not gzip despite ``.gz``, a
truncated gzip stream, an unreadable Parquet file or one without the column, a permission error) is
an :class:`~data_tools.validation.InputFileError` naming the file and the fix.
"""

from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from data_tools.run_output import is_run_dir_name
from data_tools.validation import InputFileError
from longcat_megatron.errors import UserInputError

FORMATS = ("auto", "jsonl", "parquet", "text")


class InputError(UserInputError):
    """An input path or format is unusable; the message names it."""


@dataclass
class Chunk:
    """Raw records of one input file: ``records`` are (location, payload) pairs.

    ``kind`` is 'jsonl' (payload: bytes of one line), 'text' (bytes of a line or a whole file) or
    'values' (payload: an already-extracted str or None, from Parquet).
    """

    kind: str
    path: str
    records: list = field(default_factory=list)
    nbytes: int = 0


def expand_inputs(patterns: list[str], excluded: Optional[list] = None, is_output=None) -> list[str]:
    """Files named by paths, globs (``**`` allowed) or directories, sorted, without duplicates.

    Outputs of the data tools are never inputs: files for which ``is_output(path)`` is true (this
    run's own outputs and run directories) and megatron-core dataset files with their sidecars are
    left out and appended to ``excluded``.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = []
            for r, dirs, fs in os.walk(pattern):
                dirs[:] = [d for d in dirs if not is_run_dir_name(d)]  # runs in progress (ours included)
                matches += [os.path.join(r, f) for f in fs]
        else:
            matches = glob.glob(pattern, recursive=True)
        matches = [m for m in matches if os.path.exists(m) and not os.path.isdir(m)]  # files, pipes
        if not matches:
            raise InputError(f"--input '{pattern}' matches no file")
        kept = [m for m in matches if not ((is_output is not None and is_output(m)) or is_dataset_file(m))]
        if excluded is not None:
            excluded.extend(sorted(set(matches) - set(kept)))
        if not kept:
            raise InputError(f"--input '{pattern}' matches only outputs of the data tools "
                             f"({', '.join(sorted(matches)[:3])}...), no input file")
        files.extend(sorted(kept))
    seen: set = set()
    return [f for f in files if not (f in seen or seen.add(f))]


_DATASET_SIDECARS = (".meta.json", ".summary.json", ".skipped.tsv")


def is_dataset_file(path: str) -> bool:
    """A megatron-core ``.bin``/``.idx`` (with its pair present) or a data-tools sidecar of one."""
    if path.endswith((".bin", ".idx")):
        other = path[:-4] + (".idx" if path.endswith(".bin") else ".bin")
        return os.path.isfile(other) and _is_index(path[:-4] + ".idx")
    for suffix in _DATASET_SIDECARS:
        if path.endswith(suffix):
            prefix = path[: -len(suffix)]
            return any(_is_index(p) for p in glob.glob(glob.escape(prefix) + "*.idx"))
    return False


def _is_index(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(9) == b"MMIDIDX\x00\x00"
    except OSError:
        return False


def detect_format(path: str, requested: str) -> str:
    """'jsonl', 'parquet' or 'text' for a file (by extension unless a format is requested)."""
    if requested != "auto":
        return requested
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


_BOM = b"\xef\xbb\xbf"


def _open_binary(path: str):
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read input '{path}': {exc.strerror or exc}. Fix its permissions "
                             "or remove it from --input.") from None


def _file_error(path: str, exc: BaseException, where: str) -> InputFileError:
    """An InputFileError naming the file and the fix for an error raised while reading it."""
    import zlib

    if isinstance(exc, gzip.BadGzipFile):
        return InputFileError(f"'{path}' is named .gz but is not gzip-compressed: compress it with gzip, or "
                              "rename it without .gz. Nothing was written.")
    if isinstance(exc, (EOFError, zlib.error)):
        return InputFileError(f"'{path}' is a truncated or corrupt gzip file ({exc}; readable up to {where}): "
                              "re-download or re-compress it, or remove it from --input. Nothing was written.")
    return InputFileError(f"cannot read input '{path}' at {where} ({exc}). Fix or remove it. Nothing was written.")


_READ_ERRORS = (OSError, EOFError)  # gzip.BadGzipFile is an OSError; zlib.error is handled below


def _line_chunks(path: str, kind: str, chunk_bytes: int) -> Iterator[Chunk]:
    import zlib

    chunk = Chunk(kind, path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                chunk.records.append((lineno, line))
                chunk.nbytes += len(line)
                if chunk.nbytes >= chunk_bytes:
                    yield chunk
                    chunk = Chunk(kind, path)
    except (*_READ_ERRORS, zlib.error) as exc:
        raise _file_error(path, exc, f"line {lineno}" if lineno else "the start") from None
    if chunk.records:
        yield chunk


def _parquet_chunks(path: str, key: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise InputFileError(f"'{path}' is not a readable Parquet file ({exc}): re-export it or remove it "
                             "from --input. Nothing was written.") from None
    if key not in pf.schema_arrow.names:
        raise InputFileError(f"'{path}' has no column '{key}' (its columns: {pf.schema_arrow.names}): pass "
                             "--json-key COLUMN. Nothing was written.")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[key], batch_size=1024):
            values = batch.column(0).to_pylist()
            chunk = Chunk("values", path)
            for v in values:
                row += 1
                chunk.records.append((f"row {row}", v))
                chunk.nbytes += len(v) if isinstance(v, str) else 0
            yield chunk
    except Exception as exc:  # noqa: BLE001
        raise InputFileError(f"'{path}': Parquet data unreadable from row {row + 1} on ({exc}): re-export it "
                             "or remove it from --input. Nothing was written.") from None


def iter_chunks(path: str, fmt: str, *, json_key: str, text_unit: str, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Stream one input file as chunks of about ``chunk_bytes``."""
    import zlib

    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        yield from _line_chunks(path, "jsonl", chunk_bytes)
    elif fmt == "parquet":
        yield from _parquet_chunks(path, json_key)
    elif text_unit == "line":
        yield from _line_chunks(path, "text", chunk_bytes)
    else:
        try:
            with _open_binary(path) as f:
                data = f.read()
        except (*_READ_ERRORS, zlib.error) as exc:
            raise _file_error(path, exc, "the start") from None
        if data.startswith(_BOM):
            data = data[len(_BOM):]
        yield Chunk("text", path, records=[("file", data)], nbytes=len(data))


def input_size(path: str) -> Optional[int]:
    """Bytes of a file as read (None for gzip and pipes, whose size is unknown up front)."""
    if path.endswith(".gz") or not os.path.isfile(path):
        return None
    return os.path.getsize(path)
