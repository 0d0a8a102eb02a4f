"""Tokenize chat JSONL for SFT and pack conversations into fixed-length samples.

Example::

    python -m data_tools.sft --input chats.jsonl --tokenizer TOKDIR --output-prefix data/sft \\
        --seq-length 8192 --workers 8

Each line is ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
"tool_calls": [...]}, ...], "tools": [...]}``. Conversations are rendered with the tokenizer's chat
template when it has one (``--template auto``/``hf``), else with the documented LongCat-style format
(``--template longcat``; see ``data_tools/chat_format.py``), giving token ids and a loss mask that is
1 exactly on assistant tokens. Conversations are packed in input order into samples of
``seq-length + 1`` tokens (a conversation that does not fit starts a new sample; longer ones are
skipped, or truncated with ``--truncate``).

Output (megatron-core indexed datasets, one *sequence* per conversation and one *document* per packed
sample, so conversation boundaries live in the index): ``PREFIX.bin/.idx`` (token ids) and
``PREFIX_loss_mask.bin/.idx`` (uint8 mask), plus ``PREFIX.summary.json``. Bad lines (invalid UTF-8,
malformed JSON, bad roles, no assistant turn) are skipped with ``file:line``, or stop the run with
``--strict``. Train on it with ``data.sft: true`` and ``data.paths: [PREFIX]`` and ``build_sft_iterators``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from data_tools.chat_format import (
    ChatFormatError, HFChatTemplate, tokenize_hf, tokenize_longcat, validate_messages,
)
from data_tools.indexed_writer import IndexedWriter, token_dtype
from data_tools.ordered_pool import make_pool, ordered_map
from data_tools.preprocess import PreprocessSummary, location
from data_tools.sources import expand_inputs, iter_chunks
from longcat_megatron.data.tokenizer import TokenizerDirError, load_tokenizer, tokenizer_info
from longcat_megatron.errors import UserInputError

MASK_SUFFIX = "_loss_mask"
_STATE: dict = {}


def resolve_template(requested: str, chat_template: Optional[str]) -> str:
    """'hf' or 'longcat' for ``--template auto|hf|longcat``."""
    if requested == "hf" and not chat_template:
        raise TokenizerDirError("--template hf: the tokenizer has no chat_template; use --template longcat")
    if requested == "auto":
        return "hf" if chat_template else "longcat"
    return requested


def _init_worker(tokenizer_path: str, template: str) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = load_tokenizer(tokenizer_path)
    info = tokenizer_info(tokenizer_path, tok)
    special = {"eos_token": tok.id_to_token(info.eos_id),
               "bos_token": tok.id_to_token(info.bos_id) if info.bos_id is not None else "",
               "pad_token": tok.id_to_token(info.pad_id) if info.pad_id is not None else ""}
    _STATE.update(tok=tok, eos=info.eos_id, hf=HFChatTemplate(info.chat_template, special) if template == "hf" else None)


def tokenize_record(payload: bytes):
    """(ids, mask) for one JSONL line, or a skip reason string."""
    try:
        record = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    except json.JSONDecodeError as exc:
        return f"malformed JSON ({exc.msg} at column {exc.colno})"
    try:
        messages = validate_messages(record)
        if _STATE["hf"] is not None:
            chat = tokenize_hf(_STATE["tok"], _STATE["hf"], messages, record.get("tools"), _STATE["eos"])
        else:
            chat = tokenize_longcat(_STATE["tok"], messages, _STATE["eos"])
    except ChatFormatError as exc:
        return str(exc)
    return chat.ids, chat.loss_mask


def _tokenize_chunk(chunk) -> list:
    out = []
    for loc, payload in chunk.records:
        out.append((loc, "blank line" if not payload.strip() else tokenize_record(payload)))
    return out


class Packer:
    """Greedy in-order packing of conversations into samples of ``capacity`` tokens."""

    def __init__(self, ids_writer: IndexedWriter, mask_writer: IndexedWriter, capacity: int):
        self.ids_writer, self.mask_writer, self.capacity = ids_writer, mask_writer, capacity
        self._ids: list = []
        self._masks: list = []
        self._used = 0

    def add(self, ids: list, mask: list) -> None:
        if self._used + len(ids) > self.capacity:
            self.flush()
        self._ids.append(ids)
        self._masks.append(mask)
        self._used += len(ids)

    def flush(self) -> None:
        if not self._ids:
            return
        lengths = np.array([len(x) for x in self._ids], dtype=np.int32)
        groups = np.array([len(self._ids)], dtype=np.int64)
        self.ids_writer.add_documents(np.concatenate(self._ids), lengths, groups)
        self.mask_writer.add_documents(np.concatenate(self._masks), lengths, groups)
        self._ids, self._masks, self._used = [], [], 0


def preprocess_sft(
    inputs: list[str], tokenizer: str, output_prefix: str, *, seq_length: int, template: str = "auto",
    workers: int = 1, strict: bool = False, truncate: bool = False,
) -> PreprocessSummary:
    """Tokenize and pack chat JSONL into ``PREFIX`` and ``PREFIX_loss_mask``; returns the summary."""
    files = expand_inputs(inputs)
    info = tokenizer_info(tokenizer)
    mode = resolve_template(template, info.chat_template)
    capacity = seq_length + 1
    summary = PreprocessSummary()
    start = time.monotonic()
    pool = make_pool(workers, _init_worker, (tokenizer, mode))
    try:
        with IndexedWriter(output_prefix, token_dtype(info.vocab_size)) as ids_w, \
                IndexedWriter(output_prefix + MASK_SUFFIX, np.uint8) as mask_w:
            packer = Packer(ids_w, mask_w, capacity)
            for path in files:
                chunks = iter_chunks(path, "jsonl", json_key="messages", text_unit="line")
                for results in ordered_map(pool, _tokenize_chunk, chunks, window=4 * max(1, workers)):
                    for loc, result in results:
                        if isinstance(result, str):
                            summary.record_skip(location(path, loc), result, strict)
                            continue
                        ids, mask = result
                        if len(ids) > capacity:
                            if not truncate:
                                summary.record_skip(location(path, loc), "conversation longer than seq-length + 1 "
                                                    f"({len(ids)} > {capacity} tokens; use --truncate)", strict)
                                continue
                            ids, mask = ids[:capacity], mask[:capacity]
                        packer.add(ids, mask)
                        summary.documents += 1
                        summary.tokens += len(ids)
            packer.flush()
            meta = {"kind": "sft", "template": mode, "seq_length": seq_length, "tokenizer": os.path.abspath(tokenizer)}
            ids_counts = ids_w.finalize(meta)
            mask_w.finalize(meta)
    finally:
        pool.terminate()
        pool.join()
    summary.shards = [{"input": ", ".join(files), "prefix": output_prefix, **ids_counts}]
    summary.seconds = time.monotonic() - start
    summary.write_json(output_prefix + ".summary.json")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.sft", description=__doc__.split("Example::")[0].strip(),
        epilog=__doc__.split("Example::")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="chat JSONL files or globs")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.* and PREFIX_loss_mask.*")
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length (data.seq_length)")
    parser.add_argument("--template", choices=("auto", "hf", "longcat"), default="auto",
                        help="auto: the tokenizer's chat template if it has one, else longcat")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line (file:line)")
    parser.add_argument("--truncate", action="store_true", help="truncate over-long conversations instead of skipping")
    args = parser.parse_args(argv)
    try:
        summary = preprocess_sft(args.input, args.tokenizer, args.output_prefix, seq_length=args.seq_length,
                                 template=args.template, workers=args.workers, strict=args.strict,
                                 truncate=args.truncate)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
