"""Worker-process side of preprocessing: validate raw records and tokenize the good ones.

Each worker loads the tokenizer once (:func:`init_worker`) and turns a :class:`~data_tools.sources.Chunk`
into a :class:`TokenizedChunk`: one flat id array, per-document lengths (EOS appended to every
document) and the skipped records with the reason. Validation rules, in order: invalid UTF-8,
malformed JSON, not a JSON object, missing key, non-string value, empty (whitespace-only) document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_tools.sources import Chunk

_STATE: dict = {}


@dataclass
class TokenizedChunk:
    path: str
    ids: np.ndarray
    lengths: np.ndarray
    skipped: list = field(default_factory=list)  # (location, reason)
    nbytes: int = 0


def init_worker(
    tokenizer_path: str, json_key: str, eos_id: int, bos_id: Optional[int], threads: int, dtype: str
) -> None:
    """Pool initializer: load the tokenizer with ``threads`` tokenizer threads per worker."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    from longcat_megatron.data.tokenizer import load_tokenizer

    _STATE.update(
        tokenizer=load_tokenizer(tokenizer_path), key=json_key, eos=eos_id, bos=bos_id, dtype=dtype,
    )


def extract_text(kind: str, payload, key: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a usable record, else (None, reason)."""
    if kind in ("jsonl", "text"):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"invalid UTF-8 at byte {exc.start}"
        if kind == "jsonl":
            if not line.strip():
                return None, "blank line"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(obj, dict):
                return None, f"JSON value is a {type(obj).__name__}, not an object"
            if key not in obj:
                return None, f"missing key '{key}'"
            text = obj[key]
        else:
            text = line
    else:
        text = payload
        if text is None:
            return None, f"missing (null) value in column '{key}'"
    if not isinstance(text, str):
        return None, f"key '{key}' holds a {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty document"
    return text, None


def tokenize_chunk(chunk: Chunk) -> TokenizedChunk:
    """Validate and tokenize one chunk in the worker (EOS appended per document)."""
    tok, key, eos, bos = _STATE["tokenizer"], _STATE["key"], _STATE["eos"], _STATE["bos"]
    texts, skipped = [], list(chunk.errors)
    for loc, payload in chunk.records:
        text, reason = extract_text(chunk.kind, payload, key)
        if reason is None:
            texts.append((loc, text))
        else:
            skipped.append((loc, reason))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode([t for _, t in texts], add_special_tokens=False) if texts else []
    flat: list[int] = []
    lengths: list[int] = []
    prefix = [bos] if bos is not None else []
    for (loc, _), enc in zip(texts, encodings):
        ids = enc.ids
        if not ids:
            skipped.append((loc, "no tokens after tokenization"))
            continue
        flat.extend(prefix)
        flat.extend(ids)
        flat.append(eos)
        lengths.append(len(ids) + len(prefix) + 1)
    return TokenizedChunk(
        path=chunk.path,
        ids=np.array(flat, dtype=_STATE["dtype"]),
        lengths=np.array(lengths, dtype=np.int32),
        skipped=skipped,
        nbytes=chunk.nbytes,
    )
