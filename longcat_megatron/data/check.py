"""The one data check that training and ``--dry-run`` share: every problem names the file and the fix.

:func:`check_data` runs, for every prefix of ``data.paths`` (and its ``_loss_mask`` twin for SFT):

* the ``.bin``/``.idx`` consistency of :func:`~longcat_megatron.data.indexed_files.check_indexed_pair`
  (sizes, header, the ``PREFIX.meta.json`` record of the run that wrote them when present);
* a dataset with 0 documents or 0 tokens is refused (megatron-core cannot open it);
* content checks that need no sidecar and read only a few KB: up to :data:`EOD_SAMPLES` evenly spaced
  sequences must end with the EOS id (our tools end every document and conversation with it), which
  catches a ``.bin`` swapped with another of equal size, or a wrong ``data.tokenizer`` /
  ``data.eod_token_id``; for SFT the ids and mask datasets must describe the same conversations and
  the sampled mask values must be 0/1. ``data.check_eod=false`` turns the EOS check off for data made
  elsewhere without EOS (Megatron-LM's ``preprocess_data.py`` without ``--append-eod``).
"""

from __future__ import annotations

import numpy as np

from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.indexed_files import DTYPE_BY_CODE, IndexedDataError, check_indexed_pair

EOD_SAMPLES = 1024
MASK_SUFFIX = "_loss_mask"
_HEADER_BYTES = 34


def _sampled_sequences(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, EOD_SAMPLES)).astype(np.int64))


def _index_arrays(prefix: str, sequences: int):
    mm = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=sequences, offset=_HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=sequences, offset=_HEADER_BYTES + 4 * sequences)
    return lengths, pointers


def _sequence_ends(prefix: str, summary: dict, picks: np.ndarray) -> np.ndarray:
    """The last token of each picked sequence, read from ``PREFIX.bin``."""
    dtype = np.dtype(summary["dtype"])
    lengths, pointers = _index_arrays(prefix, summary["sequences"])
    positions = pointers[picks] // dtype.itemsize + lengths[picks].astype(np.int64) - 1
    tokens = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    return np.asarray(tokens[positions]).astype(np.int64)


def check_prefix(prefix: str, eod_id: int | None, *, sft: bool = False) -> dict:
    """Check one dataset prefix (``eod_id`` None: no EOS check); returns its index summary."""
    summary = check_indexed_pair(prefix)
    if summary["documents"] == 0 or summary["tokens"] == 0:
        tool = "data_tools.sft" if sft else "data_tools.preprocess"
        raise IndexedDataError(
            f"'{prefix}.bin/.idx' hold 0 documents ({summary['tokens']} tokens): megatron-core cannot train on "
            f"an empty dataset. Re-run `python -m {tool}` on inputs with usable records (its summary lists "
            "why records were skipped), or remove the prefix from data.paths."
        )
    picks = _sampled_sequences(summary["sequences"])
    if eod_id is not None:
        ends = _sequence_ends(prefix, summary, picks)
        bad = np.nonzero(ends != eod_id)[0]
        if bad.size:
            k = int(bad[0])
            raise IndexedDataError(
                f"'{prefix}.bin': {bad.size} of {picks.size} sampled {'conversations' if sft else 'documents'} "
                f"do not end with the EOS id {eod_id} (sequence {int(picks[k])} ends with {int(ends[k])}). "
                f"Either '{prefix}.bin' and '{prefix}.idx' do not belong together (swapped or copied from "
                "different runs: re-create both from one run), or data.tokenizer / data.eod_token_id is not the "
                "tokenizer the data was made with (fix it). Data made without EOS on purpose (Megatron-LM "
                "preprocess_data.py without --append-eod): set data.check_eod=false."
            )
    if sft:
        mask_prefix = prefix + MASK_SUFFIX
        mask = check_indexed_pair(mask_prefix)
        ids_lengths, _ = _index_arrays(prefix, summary["sequences"])
        mask_lengths, mask_pointers = _index_arrays(mask_prefix, mask["sequences"])
        if mask["sequences"] != summary["sequences"] or mask["documents"] != summary["documents"] \
                or not np.array_equal(ids_lengths, mask_lengths):
            raise IndexedDataError(
                f"'{prefix}' and '{mask_prefix}' describe different conversations; re-create both with "
                "`python -m data_tools.sft`"
            )
        if np.dtype(mask["dtype"]) != np.dtype(DTYPE_BY_CODE[1]):
            raise IndexedDataError(f"'{mask_prefix}.bin' holds {mask['dtype']}, not a uint8 loss mask; "
                                   "re-create it with `python -m data_tools.sft`")
        values = np.memmap(mask_prefix + ".bin", mode="r", dtype=np.uint8)
        sampled = np.asarray(values[mask_pointers[picks]])
        if (sampled > 1).any():
            raise IndexedDataError(f"'{mask_prefix}.bin' holds values other than 0/1: it is not a loss mask "
                                   "(swapped files?); re-create it with `python -m data_tools.sft`")
    return summary


def check_data(data_cfg: DataConfig) -> str:
    """Validate ``data`` (config fields, files and contents); returns a one-line description.

    Raises a UserInputError subclass naming the file and the fix. ``data.mock`` needs no files.
    """
    data_cfg.validate()
    if data_cfg.mock:
        return "data: synthetic (data.mock)"
    from longcat_megatron.data.tokenizer import resolve_eod_token_id

    eod = resolve_eod_token_id(data_cfg) if data_cfg.check_eod else None
    documents = tokens = 0
    for prefix in data_cfg.prefixes():
        summary = check_prefix(prefix, eod, sft=data_cfg.sft)
        documents += summary["documents"]
        tokens += summary["tokens"]
    unit = "packed samples" if data_cfg.sft else "documents"
    return (f"data OK: {len(data_cfg.prefixes())} dataset(s), {documents:,} {unit}, {tokens:,} tokens"
            + (f", every sampled sequence ends with EOS {eod}" if eod is not None else ""))

