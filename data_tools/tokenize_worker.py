"""Worker-process side of preprocessing: validate raw records and tokenize the good ones.

Each worker loads the tokenizer once (:func:`init_worker`) and turns a :class:`~data_tools.sources.Chunk`
into a :class:`TokenizedChunk`: one flat id array, per-document lengths (EOS appended to every
document) and the skipped records with their :data:`~data_tools.validation.SKIP_REASONS` code.
Validation rules, in order: invalid_utf8, blank_line, malformed_json, not_an_object, missing_key,
lone_surrogate, null_value, not_a_string, empty_document, then no_tokens after tokenization.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_tools.sources import Chunk
from data_tools.validation import (
    RecordSkip, has_lone_surrogate, json_error_detail, json_type, may_hold_surrogate_escape,
)

_STATE: dict = {}


@dataclass
class TokenizedChunk:
    path: str
    ids: np.ndarray
    lengths: np.ndarray
    skipped: list = field(default_factory=list)  # (location, code, detail)
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


def extract_text(kind: str, payload, key: str) -> str:
    """The document text of one raw record; raises :class:`RecordSkip` for an unusable one."""
    if kind in ("jsonl", "text"):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordSkip("invalid_utf8", f"at byte {exc.start}") from None
        if kind == "jsonl":
            if not line.strip():
                raise RecordSkip("blank_line")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordSkip("malformed_json", json_error_detail(exc)) from None
            if not isinstance(obj, dict):
                raise RecordSkip("not_an_object", f"the line is a JSON {json_type(obj)}")
            if key not in obj:
                raise RecordSkip("missing_key", f"no '{key}'; keys: {', '.join(map(repr, list(obj)[:6]))}")
            text = obj[key]
            if isinstance(text, str) and may_hold_surrogate_escape(line) and has_lone_surrogate(text):
                raise RecordSkip("lone_surrogate", f"in '{key}'")
        else:
            text = line
    else:
        text = payload
        if text is None:
            raise RecordSkip("null_value", f"column '{key}'")
    if not isinstance(text, str):
        raise RecordSkip("not_a_string", f"'{key}' is a JSON {json_type(text)}")
    if not text.strip():
        raise RecordSkip("empty_document")
    return text


def tokenize_chunk(chunk: Chunk) -> TokenizedChunk:
    """Validate and tokenize one chunk in the worker (EOS appended per document)."""
    tok, key, eos, bos = _STATE["tokenizer"], _STATE["key"], _STATE["eos"], _STATE["bos"]
    texts, skipped = [], []
    for loc, payload in chunk.records:
        try:
            texts.append((loc, extract_text(chunk.kind, payload, key)))
        except RecordSkip as skip:
            skipped.append((loc, skip.code, skip.detail))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode([t for _, t in texts], add_special_tokens=False) if texts else []
    flat: list[int] = []
    lengths: list[int] = []
    prefix = [bos] if bos is not None else []
    for (loc, _), enc in zip(texts, encodings):
        ids = enc.ids
        if not ids:
            skipped.append((loc, "no_tokens", ""))
            continue
        flat.extend(prefix)
        flat.extend(ids)
        flat.append(eos)
        lengths.append(len(ids) + len(prefix) + 1)
    skipped.sort(key=lambda s: _order(s[0]))
    return TokenizedChunk(
        path=chunk.path,
        ids=np.array(flat, dtype=_STATE["dtype"]),
        lengths=np.array(lengths, dtype=np.int32),
        skipped=skipped,
        nbytes=chunk.nbytes,
    )


def _order(loc) -> int:
    return loc if isinstance(loc, int) else int(str(loc).rsplit(" ", 1)[-1]) if str(loc)[-1:].isdigit() else 0
