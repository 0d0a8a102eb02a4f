"""Streaming writer of megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

Memory stays flat: tokens go straight to a temporary ``.bin``, sequence lengths and document ends to
temporary spool files; the ``.idx`` (header, int32 sequence lengths, int64 byte pointers, int64
document indices) is assembled from the spools in chunks at the end. Nothing carries the final
names until :meth:`IndexedWriter.finalize` renames the finished files, so an interrupted run leaves
only ``*.tmp-<pid>`` files, never a pair that looks complete. ``finalize`` also writes the
``PREFIX.meta.json`` sidecar that lets the loader detect a ``.bin``/``.idx`` mixed from two runs.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Optional

import numpy as np

from longcat_megatron.data.indexed_files import CODE_BY_DTYPE, INDEX_HEADER, SIDECAR_SUFFIX, write_sidecar

_CHUNK = 1 << 20  # documents per chunk when assembling the index


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as megatron-core chooses), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedWriter:
    """Write one indexed dataset; use as a context manager (an exception removes the temp files)."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_BY_DTYPE:
            raise ValueError(f"dtype {self.dtype} cannot be stored in a megatron-core index")
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = prefix + ".bin" + tag
        self._len_tmp = prefix + ".lengths" + tag
        self._docs_tmp = prefix + ".docs" + tag
        self._idx_tmp = prefix + ".idx" + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = open(self._len_tmp, "wb")
        self._doc_ends = open(self._docs_tmp, "wb")
        self.sequences = 0
        self.documents = 0
        self.tokens = 0

    def add_documents(
        self, flat_ids: np.ndarray, lengths: np.ndarray, sequences_per_document: Optional[np.ndarray] = None
    ) -> None:
        """Append sequences given as one flat id array and their lengths (sum(lengths) == len(ids)).

        Each sequence is its own document unless ``sequences_per_document`` groups them (packed SFT
        data stores one conversation per sequence and one packed sample per document).
        """
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != len(flat_ids):
            raise ValueError("lengths do not add up to the number of ids")
        if sequences_per_document is None:
            sequences_per_document = np.ones(len(lengths), dtype=np.int64)
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if int(counts.sum()) != len(lengths):
            raise ValueError("sequences_per_document does not add up to the number of sequences")
        self._bin.write(np.asarray(flat_ids, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.tobytes())
        self._doc_ends.write((self.sequences + np.cumsum(counts)).tobytes())
        self.sequences += len(lengths)
        self.documents += len(counts)
        self.tokens += len(flat_ids)

    def append_raw(self, bin_path: str, lengths: Iterable[np.ndarray]) -> None:
        """Append another dataset's ``.bin`` bytes (same dtype) and its lengths (for merging)."""
        with open(bin_path, "rb") as src:
            while True:
                block = src.read(1 << 24)
                if not block:
                    break
                self._bin.write(block)
        for chunk in lengths:
            chunk = np.asarray(chunk, dtype=np.int32)
            self._lengths.write(chunk.tobytes())
            self._doc_ends.write((self.sequences + np.arange(1, len(chunk) + 1, dtype=np.int64)).tobytes())
            self.sequences += len(chunk)
            self.documents += len(chunk)
            self.tokens += int(chunk.sum(dtype=np.int64))

    def _write_index(self) -> None:
        n = self.sequences
        itemsize = self.dtype.itemsize
        lengths = np.memmap(self._len_tmp, dtype=np.int32, mode="r") if n else np.zeros(0, np.int32)
        doc_ends = np.memmap(self._docs_tmp, dtype=np.int64, mode="r") if n else np.zeros(0, np.int64)
        with open(self._idx_tmp, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", CODE_BY_DTYPE[self.dtype]))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", self.documents + 1))
            for s in range(0, n, _CHUNK):
                idx.write(np.asarray(lengths[s : s + _CHUNK], dtype=np.int32).tobytes())
            offset = 0
            for s in range(0, n, _CHUNK):
                part = np.asarray(lengths[s : s + _CHUNK], dtype=np.int64) * itemsize
                pointers = np.empty_like(part)
                pointers[0] = offset
                np.cumsum(part[:-1], out=pointers[1:])
                pointers[1:] += offset
                offset += int(part.sum())
                idx.write(pointers.tobytes())
            idx.write(np.zeros(1, dtype=np.int64).tobytes())
            for s in range(0, self.documents, _CHUNK):
                idx.write(np.asarray(doc_ends[s : s + _CHUNK], dtype=np.int64).tobytes())
        del lengths, doc_ends

    def finalize(self, extra_meta: Optional[dict] = None) -> dict:
        """Write the index, then give the files their final names; returns docs/tokens counts."""
        for f in (self._bin, self._lengths, self._doc_ends):
            f.close()
        self._write_index()
        os.remove(self._len_tmp)
        os.remove(self._docs_tmp)
        # Remove the old pair's sidecar and index first: a crash between the renames below leaves a
        # .bin without a matching .idx, which the loader reports, never a stale-but-complete pair.
        for old in (self.prefix + SIDECAR_SUFFIX, self.prefix + ".idx"):
            if os.path.exists(old):
                os.remove(old)
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")
        result = {"documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                  "dtype": self.dtype.name}
        write_sidecar(self.prefix, {**result, **(extra_meta or {})})
        return result

    def abort(self) -> None:
        """Close and delete the temporary files (the final names are untouched)."""
        for f in (self._bin, self._lengths, self._doc_ends):
            f.close()
        for path in (self._bin_tmp, self._len_tmp, self._docs_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
