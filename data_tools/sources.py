"""Input files for preprocessing, read as a stream of small chunks of raw records.

Formats: JSONL (``.jsonl``/``.json``, optionally ``.gz``), Parquet (``.parquet``) and plain text
(anything else, optionally ``.gz``; one document per file or per line). Reading never decodes or
parses JSON: that happens in the worker processes (:mod:`data_tools.tokenize_worker`), so a bad line
costs the reader nothing and is reported with its location there. A Parquet file that cannot be
opened or read (e.g. truncated) yields a chunk carrying that error instead of records.
"""

from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from longcat_megatron.errors import UserInputError

FORMATS = ("auto", "jsonl", "parquet", "text")


class InputError(UserInputError):
    """An input path or format is unusable; the message names it."""


@dataclass
class Chunk:
    """Raw records of one input file: ``records`` are (location, payload) pairs.

    ``kind`` is 'jsonl' (payload: bytes of one line), 'text' (bytes of a line or a whole file) or
    'values' (payload: an already-extracted str or None, from Parquet). ``errors`` holds
    (location, reason) found while reading (e.g. an unreadable Parquet file).
    """

    kind: str
    path: str
    records: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    nbytes: int = 0


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, globs (``**`` allowed) or directories, sorted, without duplicates."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = [os.path.join(r, f) for r, _, fs in os.walk(pattern) for f in fs]
        else:
            matches = glob.glob(pattern, recursive=True)
        matches = [m for m in matches if os.path.exists(m) and not os.path.isdir(m)]  # files, pipes
        if not matches:
            raise InputError(f"--input '{pattern}' matches no file")
        files.extend(sorted(matches))
    seen: set = set()
    return [f for f in files if not (f in seen or seen.add(f))]


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


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _line_chunks(path: str, kind: str, chunk_bytes: int) -> Iterator[Chunk]:
    chunk = Chunk(kind, path)
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            chunk.records.append((lineno, line))
            chunk.nbytes += len(line)
            if chunk.nbytes >= chunk_bytes:
                yield chunk
                chunk = Chunk(kind, path)
    if chunk.records:
        yield chunk


def _parquet_chunks(path: str, key: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        yield Chunk("values", path, errors=[("file", f"unreadable Parquet file ({exc})")])
        return
    if key not in pf.schema_arrow.names:
        yield Chunk("values", path, errors=[("file", f"missing column '{key}' (has {pf.schema_arrow.names})")])
        return
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
        yield Chunk("values", path, errors=[(f"row {row + 1}", f"unreadable Parquet data from here on ({exc})")])


def iter_chunks(path: str, fmt: str, *, json_key: str, text_unit: str, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Stream one input file as chunks of about ``chunk_bytes``."""
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        yield from _line_chunks(path, "jsonl", chunk_bytes)
    elif fmt == "parquet":
        yield from _parquet_chunks(path, json_key)
    elif text_unit == "line":
        yield from _line_chunks(path, "text", chunk_bytes)
    else:
        with _open_binary(path) as f:
            data = f.read()
        yield Chunk("text", path, records=[("file", data)], nbytes=len(data))


def input_size(path: str) -> Optional[int]:
    """Bytes of a file as read (None for gzip and pipes, whose size is unknown up front)."""
    if path.endswith(".gz") or not os.path.isfile(path):
        return None
    return os.path.getsize(path)
