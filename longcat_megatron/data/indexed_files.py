"""Consistency checks for megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

megatron-core opens a ``.bin``/``.idx`` pair without checking that they belong together; a truncated
``.bin`` or an ``.idx`` from another run then fails much later (or silently reads garbage).
:func:`check_indexed_pair` reads the ``.idx`` (never the whole ``.bin``) and compares it with the
``.bin`` size, so it is cheap even for terabyte datasets. When our preprocessing wrote a
``PREFIX.meta.json`` sidecar, the pair is also compared with the run that wrote it (sizes and
digests of sampled ``.idx``/``.bin`` blocks), which catches a pair mixed from two runs of
equal size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from longcat_megatron.errors import UserInputError

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron-core DType codes -> numpy dtypes (megatron/core/datasets/indexed_dataset.py).
DTYPE_BY_CODE = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
    8: np.uint16,
}
CODE_BY_DTYPE = {np.dtype(v): k for k, v in DTYPE_BY_CODE.items()}
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
SIDECAR_SUFFIX = ".meta.json"


class IndexedDataError(UserInputError):
    """A ``.bin``/``.idx`` pair is missing, truncated or mismatched; the message names the files."""


def sampled_digest(path: str, span: int = 1 << 16, samples: int = 16) -> str:
    """SHA-256 of the size and ``samples`` evenly spaced ``span``-byte blocks of a file (cheap)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(samples):
            f.seek(max(0, (size - span) * k // max(1, samples - 1)))
            h.update(f.read(span))
    return h.hexdigest()


def read_index_summary(prefix: str) -> dict:
    """Header facts of ``PREFIX.idx``: dtype, sequence/document counts, total tokens, expected .bin size."""
    idx_path = prefix + ".idx"
    if not os.path.isfile(idx_path):
        raise IndexedDataError(f"'{idx_path}' does not exist (run `python -m data_tools.preprocess`)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise IndexedDataError(f"'{idx_path}' is not a megatron-core index (bad or truncated header)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in DTYPE_BY_CODE:
        raise IndexedDataError(f"'{idx_path}': unsupported version {version} or dtype code {code}")
    expected_idx = _HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    # Multimodal indices append one int8 mode per sequence.
    if idx_size not in (expected_idx, expected_idx + seq_count):
        raise IndexedDataError(
            f"'{idx_path}' is {idx_size} bytes but its header announces {seq_count} sequences and "
            f"{doc_count} document entries ({expected_idx} bytes): the file is truncated or corrupt. "
            "Re-run the preprocessing for this prefix."
        )
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=seq_count, offset=_HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=seq_count, offset=_HEADER_BYTES + 4 * seq_count)
    docs = np.frombuffer(mm, dtype=np.int64, count=doc_count, offset=_HEADER_BYTES + 12 * seq_count)
    itemsize = np.dtype(DTYPE_BY_CODE[code]).itemsize
    bin_bytes = int(pointers[-1]) + int(lengths[-1]) * itemsize if seq_count else 0
    summary = {
        "dtype": np.dtype(DTYPE_BY_CODE[code]).name,
        "sequences": int(seq_count),
        "documents": int(doc_count) - 1 if doc_count else 0,
        "tokens": int(lengths.sum(dtype=np.int64)),
        "bin_bytes": bin_bytes,
        "idx_bytes": idx_size,
        "last_document_index": int(docs[-1]) if doc_count else 0,
    }
    del mm
    return summary


def check_indexed_pair(prefix: str) -> dict:
    """Raise :class:`IndexedDataError` unless ``PREFIX.bin`` and ``PREFIX.idx`` belong together.

    Returns the index summary (see :func:`read_index_summary`).
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    if not os.path.isfile(bin_path):
        raise IndexedDataError(f"'{bin_path}' does not exist but '{idx_path}' does: incomplete dataset")
    summary = read_index_summary(prefix)
    if summary["last_document_index"] != summary["sequences"]:
        raise IndexedDataError(
            f"'{idx_path}': document index ends at {summary['last_document_index']} but there are "
            f"{summary['sequences']} sequences; the index is corrupt. Re-run the preprocessing."
        )
    bin_size = os.path.getsize(bin_path)
    if bin_size != summary["bin_bytes"]:
        raise IndexedDataError(
            f"'{bin_path}' is {bin_size} bytes but '{idx_path}' describes {summary['bin_bytes']} bytes "
            f"({summary['tokens']} {summary['dtype']} tokens): the two files do not match (truncated "
            "copy, or .bin and .idx from different runs). Re-copy or re-create both from one run."
        )
    sidecar = prefix + SIDECAR_SUFFIX
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            meta = json.load(f)
        if (
            meta.get("bin_bytes") != bin_size
            or meta.get("idx_bytes") != summary["idx_bytes"]
            or meta.get("idx_sample_sha256") != sampled_digest(idx_path)
            or meta.get("bin_sample_sha256") != sampled_digest(bin_path)
        ):
            raise IndexedDataError(
                f"'{prefix}.bin/.idx' do not match the run recorded in '{sidecar}' (sizes or index "
                "digest differ): the files come from different preprocessing runs. Re-create them."
            )
    return summary


def write_sidecar(prefix: str, extra: dict) -> None:
    """Record sizes and sampled digests of a finished pair in ``PREFIX.meta.json`` (atomic)."""
    meta = {
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx_bytes": os.path.getsize(prefix + ".idx"),
        "idx_sample_sha256": sampled_digest(prefix + ".idx"),
        "bin_sample_sha256": sampled_digest(prefix + ".bin"),
        **extra,
    }
    tmp = prefix + SIDECAR_SUFFIX + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, prefix + SIDECAR_SUFFIX)


def sequence_lengths(prefix: str) -> np.ndarray:
    """The int32 sequence lengths of ``PREFIX.idx`` (memory-mapped, read-only)."""
    sequences = read_index_summary(prefix)["sequences"]
    return np.memmap(prefix + ".idx", mode="r", dtype=np.int32, offset=_HEADER_BYTES, shape=(sequences,))
