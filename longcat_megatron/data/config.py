"""Data settings (the ``data:`` section of a run config)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from longcat_megatron.data.manifest import expand_paths
from longcat_megatron.errors import UserInputError


class DataConfigError(UserInputError):
    """Invalid data settings; the message names the field and the fix."""


@dataclass
class DataConfig:
    # Indexed-dataset prefixes (``PREFIX.bin``/``PREFIX.idx``), optionally weighted as in Megatron-LM:
    # ["corpusA"] or [0.7, "corpusA", 0.3, "corpusB"]. An entry may be a ``PREFIX.manifest.json``
    # (written by ``data_tools.preprocess --finalize``): its datasets (longcat_megatron/data/manifest.py).
    paths: list = field(default_factory=list)
    # train/valid/test split of each prefix, in parts (Megatron-LM's --split).
    split: str = "98,2,0"
    seq_length: int = 128
    # Directory of a Hugging Face tokenizer (tokenizer.json); used for EOS id and export.
    tokenizer: Optional[str] = None
    eod_token_id: int = 2
    # Where megatron-core caches its sample indices (default: next to the data).
    cache_dir: Optional[str] = None
    # Position ids restart at each document; optional attention masking across documents (kept as
    # document starts, not a dense mask: any seq_length, under context parallelism too).
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # Synthetic random tokens instead of files (tests and dry runs only).
    mock: bool = False
    # Token ids of mock data are drawn below this (keep <= the model's vocab_size).
    mock_vocab_size: int = 256
    # ``paths`` hold packed chat data made by ``python -m data_tools.sft`` (PREFIX + PREFIX_loss_mask):
    # loss on assistant tokens only, read by ``build_sft_iterators``.
    sft: bool = False
    # Training and --dry-run check that sampled documents end with the EOS id (catches swapped
    # .bin/.idx files and a wrong tokenizer); false for data made without EOS on purpose.
    check_eod: bool = True

    def prefixes(self) -> list[str]:
        """The dataset prefixes in ``paths`` (weights dropped; manifests expanded)."""
        if not self._well_formed():
            return [p for p in self.paths if isinstance(p, str)]
        return expand_paths(self.paths)[0]

    def weights(self) -> Optional[list[float]]:
        """Blend weights, or None when ``paths`` has no weights (manifests expanded)."""
        if not self._well_formed():
            nums = [p for p in self.paths if not isinstance(p, str)]
            return [float(w) for w in nums] or None
        return expand_paths(self.paths)[1]

    def _well_formed(self) -> bool:
        """All prefixes, or [w1, prefix1, w2, prefix2, ...]."""
        if all(isinstance(p, str) for p in self.paths):
            return True
        return len(self.paths) % 2 == 0 and all(not isinstance(w, str) for w in self.paths[0::2]) \
            and all(isinstance(p, str) for p in self.paths[1::2])

    def validate(self) -> None:
        if self.seq_length < 2:
            raise DataConfigError(f"data.seq_length={self.seq_length} must be >= 2")
        if self.mock:
            return
        tool = "data_tools.sft" if self.sft else "data_tools.preprocess"
        if not self.paths:
            raise DataConfigError(
                "data.paths is empty: give indexed-dataset prefixes (made by "
                f"`python -m {tool}`), or set data.mock=true for synthetic tokens"
            )
        if not self._well_formed():
            raise DataConfigError(
                "data.paths mixes weights and prefixes unevenly: use [w1, prefix1, w2, prefix2, ...]"
            )
        suffixes = ("", "_loss_mask") if self.sft else ("",)
        for prefix in self.prefixes():
            for ext in [suffix + e for suffix in suffixes for e in (".bin", ".idx")]:
                if not os.path.isfile(prefix + ext):
                    raise DataConfigError(
                        f"data.paths: '{prefix}{ext}' does not exist. Run "
                        f"`python -m {tool}` to create it, or fix the prefix."
                    )
        parts = self.split.split(",")
        try:
            nums = [float(x) for x in parts]
        except ValueError:
            nums = []
        if not nums or sum(nums) <= 0 or any(n < 0 for n in nums):
            raise DataConfigError(f"data.split={self.split!r}: use parts like '98,2,0'")
