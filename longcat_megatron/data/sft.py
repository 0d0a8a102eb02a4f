"""Packed SFT data for the training loop (same API as :mod:`longcat_megatron.data.pretrain`).

Reads what ``python -m data_tools.sft`` writes: ``PREFIX`` (token ids) and ``PREFIX_loss_mask``
(uint8), megatron-core indexed datasets with one sequence per conversation and one document per packed
sample. ``PackedSFTDataset`` is a megatron-core ``MegatronDataset``, so blends with weights and the
train/valid split go through ``BlendedMegatronDatasetBuilder`` exactly as for pretraining. Sample
``i`` of a split is a packed sample drawn from a per-epoch permutation (seeded), padded to
``seq_length + 1`` tokens.

Per sample: ``loss_mask`` is the stored assistant mask (of the label token), zero on padding and at
conversation boundaries; ``position_ids`` restart per conversation when ``data.reset_position_ids``;
``document_starts`` (where each conversation, and the padding, starts) when
``data.reset_attention_mask``: the batch's ``attention_mask`` is then a ``DocumentMask`` that keeps
conversations apart at any length (no dense mask), else ``None`` (plain causal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset

from longcat_megatron.data.check import check_data
from longcat_megatron.data.config import DataConfig, DataConfigError
from longcat_megatron.data.indexed_files import IndexedDataError, check_indexed_pair
from longcat_megatron.data.mcore_helpers import ensure_dataset_helpers
from longcat_megatron.data.pretrain import index_cache_dir, make_iterators
from longcat_megatron.data.sampler import check_batch_layout

MASK_SUFFIX = "_loss_mask"
PAD_TOKEN_ID = 0


class PackedSFTStore:
    """The ids and loss-mask indexed datasets of one SFT prefix, checked to match."""

    def __init__(self, prefix: str):
        for p in (prefix, prefix + MASK_SUFFIX):
            check_indexed_pair(p)
        self.path_prefix = prefix
        self.ids = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX)
        if not (
            np.array_equal(self.ids.sequence_lengths, self.masks.sequence_lengths)
            and np.array_equal(self.ids.document_indices, self.masks.document_indices)
        ):
            raise IndexedDataError(
                f"'{prefix}' and '{prefix}{MASK_SUFFIX}' describe different conversations; "
                "re-create both with `python -m data_tools.sft`"
            )
        self.documents = len(self.ids.document_indices) - 1

    def pack(self, doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, conversation lengths) of packed sample ``doc``."""
        first, last = int(self.ids.document_indices[doc]), int(self.ids.document_indices[doc + 1])
        ids = np.concatenate([self.ids[s] for s in range(first, last)])
        mask = np.concatenate([self.masks[s] for s in range(first, last)])
        return ids, mask, np.asarray(self.ids.sequence_lengths[first:last])


def pack_to_sample(ids, mask, lengths, seq_length: int, reset_position_ids: bool,
                   reset_attention_mask: bool) -> dict:
    """Tensors of one packed sample (see module docstring)."""
    total = seq_length + 1
    used = int(lengths.sum())
    if used > total:
        raise IndexedDataError(f"packed sample of {used} tokens exceeds seq_length + 1 = {total}; "
                               "re-pack with `python -m data_tools.sft --seq-length` = data.seq_length")
    full = np.full(total, PAD_TOKEN_ID, dtype=np.int64)
    full[:used] = ids
    full_mask = np.zeros(total, dtype=np.float32)
    full_mask[:used] = mask
    segment = np.full(total, len(lengths), dtype=np.int64)  # padding: a segment of its own
    segment[:used] = np.repeat(np.arange(len(lengths)), lengths)
    seg_in, seg_label = segment[:-1], segment[1:]
    loss_mask = full_mask[1:] * (seg_in == seg_label)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # per conversation; starts[-1] == used (padding)
    if reset_position_ids:
        position_ids = np.arange(seq_length) - starts[seg_in]
    else:
        position_ids = np.arange(seq_length)
    sample = {
        "tokens": torch.from_numpy(full[:-1].copy()),
        "labels": torch.from_numpy(full[1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
    }
    if reset_attention_mask:
        # Input position p belongs to the conversation of token p; the padding is one more.
        inside = np.unique(starts[starts < seq_length])
        sample["document_starts"] = torch.from_numpy(inside.astype(np.int64))
    return sample


@dataclass
class SFTDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core dataset config plus the document-boundary switches of packed SFT samples."""

    reset_position_ids: bool = False
    reset_attention_mask: bool = False


class PackedSFTDataset(MegatronDataset):
    """Packed SFT samples of one prefix and split, in a seeded per-epoch shuffled order."""

    def __init__(self, store, dataset_path, indices, num_samples, index_split, config):
        super().__init__(store, dataset_path, indices, num_samples, index_split, config)
        n = len(indices)
        wanted = n if num_samples is None else num_samples
        epochs = max(1, -(-wanted // n)) if n else 0
        rng = np.random.RandomState(config.random_seed + 1000 * index_split.value)
        self.order = (np.concatenate([rng.permutation(indices) for _ in range(epochs)])
                      if epochs else np.zeros(0, dtype=np.int64))

    @staticmethod
    def numel_low_level_dataset(store) -> int:
        return store.documents

    @staticmethod
    def build_low_level_dataset(dataset_path, config):
        return PackedSFTStore(dataset_path)

    @staticmethod
    def _key_config_attributes():
        return MegatronDataset._key_config_attributes() + ["reset_position_ids", "reset_attention_mask"]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict:
        ids, mask, lengths = self.dataset.pack(int(self.order[idx]))
        return pack_to_sample(ids, mask, lengths, self.config.sequence_length,
                              self.config.reset_position_ids, self.config.reset_attention_mask)


def build_sft_datasets(data_cfg: DataConfig, *, seed: int, train_samples: int, eval_samples: int):
    """(train, valid) packed SFT datasets of ``data.paths`` (``data.sft``); valid None when its split is empty."""
    if not data_cfg.sft or data_cfg.mock:
        raise DataConfigError("build_sft_iterators needs data.sft=true and data.paths with prefixes made by "
                              "`python -m data_tools.sft` (data.mock is not supported for SFT)")
    check_data(data_cfg)
    ensure_dataset_helpers()
    prefixes = data_cfg.prefixes()
    config = SFTDatasetConfig(
        random_seed=seed, sequence_length=data_cfg.seq_length,
        blend=(prefixes, data_cfg.weights()), split=data_cfg.split,
        path_to_cache=index_cache_dir(data_cfg, prefixes),
        reset_position_ids=data_cfg.reset_position_ids, reset_attention_mask=data_cfg.reset_attention_mask,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(PackedSFTDataset, [train_samples, eval_samples, 0],
                                                    lambda: True, config).build()
    if train is None or len(train) < train_samples:
        raise DataConfigError(f"data.paths (SFT): the train split has {0 if train is None else len(train)} "
                         f"packed samples, {train_samples} asked for; check data.split")
    return train, valid


def build_sft_iterators(
    data_cfg: DataConfig, *, seed: int, micro_batch_size: int, global_batch_size: int, train_samples: int,
    eval_samples: int, dp_rank: int, dp_size: int, consumed_train_samples: int,
) -> tuple[Iterator[dict], Optional[Callable[[], Iterator[dict]]]]:
    """Like ``build_pretrain_iterators`` for packed SFT data (loss only on assistant tokens)."""
    check_batch_layout(micro_batch_size, global_batch_size, dp_rank, dp_size)
    train, valid = build_sft_datasets(data_cfg, seed=seed, train_samples=train_samples, eval_samples=eval_samples)
    return make_iterators(train, valid, micro_batch_size=micro_batch_size, train_samples=train_samples,
                          eval_samples=eval_samples, dp_rank=dp_rank, dp_size=dp_size,
                          consumed=consumed_train_samples)
