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
``PREFIX_loss_mask.bin/.idx`` (uint8 mask), plus ``PREFIX.summary.json`` (counts of *conversations*
and *packed samples*). Bad lines (invalid UTF-8, malformed JSON, bad roles or tool_calls, no
assistant turn, a template that refuses the conversation, ...) are skipped and counted by reason
code with ``file:line`` examples (every one in ``PREFIX.skipped.tsv``), or stop the run with
``--strict``; a run that keeps no conversation is an error. Outputs appear together only when the
run completes (a failed or interrupted run leaves the previous ones as they were). Exit codes: 0
done, 2 bad input, 130 Ctrl-C, 143 SIGTERM. Train on it with ``data.sft: true`` and ``data.paths: [PREFIX]`` and ``build_sft_iterators``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from data_tools.chat_format import HFChatTemplate, tokenize_hf, tokenize_longcat, validate_messages
from data_tools.cli_common import Progress, run_tool
from data_tools.indexed_writer import IndexedWriter, token_dtype
from data_tools.ordered_pool import OrderedPool
from data_tools.preprocess import REASONS_SUFFIX, SUMMARY_SUFFIX, format_details
from data_tools.run_output import RunOutput
from data_tools.sources import expand_inputs, input_size, iter_chunks
from data_tools.validation import (
    RecordSkip, SkipLog, empty_output_error, has_lone_surrogate, json_error_detail, location,
    may_hold_surrogate_escape,
)
from longcat_megatron.data.tokenizer import TokenizerDirError, load_tokenizer, tokenizer_info

MASK_SUFFIX = "_loss_mask"
_STATE: dict = {}


@dataclass
class SFTSummary:
    """What an SFT run did (also written as ``PREFIX.summary.json``).

    ``conversations`` are the kept input records (one *sequence* each in the index);
    ``packed_samples`` the fixed-length training samples they were packed into (one *document* each).
    """

    conversations: int = 0
    packed_samples: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    reasons_file: Optional[str] = None
    shards: list = field(default_factory=list)
    excluded_inputs: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    input_bytes: int = 0

    def format(self) -> str:
        lines = [f"conversations: {self.conversations:,}  packed samples: {self.packed_samples:,}  "
                 f"tokens: {self.tokens:,}  skipped records: {self.skipped:,}  truncated: {self.truncated:,}  "
                 f"time: {self.seconds:.1f}s"]
        lines += format_details(self)
        for shard in self.shards:
            lines.append(f"  {shard['input']} -> {shard['prefix']}.bin/.idx + {MASK_SUFFIX} "
                         f"({shard['packed_samples']:,} packed samples of {shard['conversations']:,} "
                         f"conversations, {shard['tokens']:,} tokens)")
        return "\n".join(lines)


def resolve_template(requested: str, chat_template: Optional[str]) -> str:
    """'hf' or 'longcat' for ``--template auto|hf|longcat``."""
    if requested == "hf" and not chat_template:
        raise TokenizerDirError("--template hf: the tokenizer has no chat_template; use --template longcat")
    if requested == "auto":
        return "hf" if chat_template else "longcat"
    return requested


def _special_tokens(tok, info) -> dict:
    return {"eos_token": tok.id_to_token(info.eos_id),
            "bos_token": tok.id_to_token(info.bos_id) if info.bos_id is not None else "",
            "pad_token": tok.id_to_token(info.pad_id) if info.pad_id is not None else ""}


def _init_worker(tokenizer_path: str, template: str) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = load_tokenizer(tokenizer_path)
    info = tokenizer_info(tokenizer_path, tok)
    hf = HFChatTemplate(info.chat_template, _special_tokens(tok, info)) if template == "hf" else None
    _STATE.update(tok=tok, eos=info.eos_id, hf=hf)


def tokenize_record(payload: bytes):
    """The TokenizedChat of one JSONL line; raises RecordSkip for a bad one."""
    try:
        line = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordSkip("invalid_utf8", f"at byte {exc.start}") from None
    if not line.strip():
        raise RecordSkip("blank_line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordSkip("malformed_json", json_error_detail(exc)) from None
    messages = validate_messages(record)
    if may_hold_surrogate_escape(line) and has_lone_surrogate(json.dumps(record, ensure_ascii=False)):
        raise RecordSkip("lone_surrogate")
    tools = record.get("tools")
    if _STATE["hf"] is not None:
        return tokenize_hf(_STATE["tok"], _STATE["hf"], messages, tools, _STATE["eos"])
    return tokenize_longcat(_STATE["tok"], messages, _STATE["eos"], tools)


def _tokenize_chunk(chunk) -> tuple[list, int]:
    """([(location, TokenizedChat | (code, detail))], input bytes) of one chunk."""
    out = []
    for loc, payload in chunk.records:
        try:
            out.append((loc, tokenize_record(payload)))
        except RecordSkip as skip:
            out.append((loc, (skip.code, skip.detail)))
    return out, chunk.nbytes


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
    workers: int = 1, strict: bool = False, truncate: bool = False, progress: bool = False,
) -> SFTSummary:
    """Tokenize and pack chat JSONL into ``PREFIX`` and ``PREFIX_loss_mask``; returns the summary.

    All outputs appear together when the run succeeds; any error leaves the previous ones as they were.
    """
    tok = load_tokenizer(tokenizer)
    info = tokenizer_info(tokenizer, tok)
    mode = resolve_template(template, info.chat_template)
    if mode == "hf":
        HFChatTemplate(info.chat_template, _special_tokens(tok, info))  # compile errors: here, named
    capacity = seq_length + 1
    with RunOutput(output_prefix) as out:
        summary = SFTSummary(notes=[info.eos_note] if info.eos_note else [])
        files = expand_inputs(inputs, summary.excluded_inputs, out.owns)
        summary.input_bytes = sum(input_size(f) or 0 for f in files)
        skips = SkipLog(out.prefix + REASONS_SUFFIX, strict)
        start = time.monotonic()
        straddling = 0
        bar = Progress(progress, summary.input_bytes, "sft")
        pool = OrderedPool(workers, _init_worker, (tokenizer, mode))
        try:
            with IndexedWriter(out.prefix, token_dtype(info.vocab_size)) as ids_w, \
                    IndexedWriter(out.prefix + MASK_SUFFIX, np.uint8) as mask_w:
                packer = Packer(ids_w, mask_w, capacity)
                for path in files:
                    chunks = iter_chunks(path, "jsonl", json_key="messages", text_unit="line")
                    for results, nbytes in pool.map(_tokenize_chunk, chunks, window=4 * max(1, workers)):
                        for loc, chat in results:
                            if isinstance(chat, tuple):
                                skips.add(location(path, loc), *chat)
                                continue
                            ids, mask = chat.ids, chat.loss_mask
                            if len(ids) > capacity:
                                if not truncate:
                                    skips.add(location(path, loc), "too_long", f"{len(ids)} > {capacity} tokens")
                                    continue
                                # keep the start and end the sample with EOS (no loss), as every conversation
                                ids, mask = ids[: capacity - 1] + [info.eos_id], mask[: capacity - 1] + [0]
                                summary.truncated += 1
                            straddling += chat.straddling
                            packer.add(ids, mask)
                            summary.conversations += 1
                            summary.tokens += len(ids)
                        bar.update(nbytes, conversations=summary.conversations, tokens=summary.tokens)
                packer.flush()
                if summary.conversations == 0:
                    raise empty_output_error(f"--input {' '.join(inputs)}", skips,
                                             "Check that each line is {\"messages\": [...]} with an assistant turn.",
                                             unit="conversations")
                meta = {"kind": "sft", "template": mode, "seq_length": seq_length,
                        "tokenizer": os.path.abspath(tokenizer)}
                ids_counts = ids_w.finalize(meta)
                mask_w.finalize(meta)
        finally:
            pool.close()
            bar.close()
            skips.close()
        if straddling:
            summary.notes.append(
                f"{straddling} assistant turn(s) start inside a token that also holds the end of the chat "
                "template's generation prompt (it ends with whitespace); that token is kept in the loss, so "
                "the reply's first word is learned, but a prompt ending in whitespace tokenizes differently at "
                "inference. Consider a template whose generation prompt ends without a trailing space.")
        summary.packed_samples = ids_counts["documents"]
        summary.shards = [{"input": ", ".join(files), "prefix": out.final_prefix,
                           "packed_samples": ids_counts["documents"], "conversations": ids_counts["sequences"],
                           "tokens": ids_counts["tokens"]}]
        summary.skipped, summary.skipped_by_reason = skips.total, skips.to_json()
        summary.reasons_file = out.final_prefix + REASONS_SUFFIX if skips.total else None
        if not skips.total:
            os.remove(out.prefix + REASONS_SUFFIX)
        summary.seconds = time.monotonic() - start
        with open(out.prefix + SUMMARY_SUFFIX, "w") as f:
            json.dump(asdict(summary), f, indent=1)
        out.commit()
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
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="worker processes (0 = in this process)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line (file:line)")
    parser.add_argument("--truncate", action="store_true",
                        help="keep the first seq-length tokens (+ EOS) of over-long conversations instead of "
                             "skipping them")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_tool(lambda: preprocess_sft(
        args.input, args.tokenizer, args.output_prefix, seq_length=args.seq_length, template=args.template,
        workers=args.workers, strict=args.strict, truncate=args.truncate, progress=not args.quiet,
    ).format())


if __name__ == "__main__":
    sys.exit(main())
