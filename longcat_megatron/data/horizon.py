"""The *sample horizon*: up to how many samples the order does not depend on the run length.

megatron-core's ``GPTDataset`` shuffles over *all* epochs it needs for ``num_samples`` at once, and a
weighted blend sizes every mid-level dataset from the requested total. Within one epoch of every
contributing dataset, however, the order is fixed by the seed alone (document shuffle, sample index
and shuffle index always cover the whole epoch) and the blending index is prefix-stable. So every
run of up to ``horizon`` samples (the largest total that needs no second epoch of any dataset) sees
the same sequence, and a run can be extended (more ``train_iters``) and resumed exactly. The
fingerprint records ``max(train_samples, horizon)``: equal for all runs within the horizon, and
different (caught on resume) once a run's length changes the multi-epoch order.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.indexed_files import sequence_lengths

# megatron-core's default BlendedMegatronDatasetConfig.mid_level_dataset_surplus (we pass it explicitly).
MID_LEVEL_SURPLUS = 0.005


def _train_bounds(split: str, count: int) -> tuple[int, int]:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split,
    )

    train = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[0]
    if train is None:
        return 0, 0
    return int(round(train[0] * float(count))), int(round(train[1] * float(count)))


def one_epoch_samples(lengths: np.ndarray, split: str, seq_length: int) -> int:
    """Samples of ``seq_length + 1`` tokens that one epoch of the train split yields (as megatron)."""
    beg, end = _train_bounds(split, len(lengths))
    tokens = int(np.asarray(lengths[beg:end]).sum(dtype=np.int64))
    return max(0, (tokens - 1) // seq_length)


def _mock_lengths(data_cfg: DataConfig) -> np.ndarray:
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    class _Vocab:
        vocab_size, eod = data_cfg.mock_vocab_size, data_cfg.eod_token_id

    return MockGPTLowLevelDataset(_Vocab()).sequence_lengths


def _largest_single_epoch_total(epochs: list[int], weights: Optional[list[float]]) -> int:
    if len(epochs) == 1:
        return epochs[0]
    if weights is None:  # unweighted blend: each dataset is built for exactly one epoch
        return sum(epochs)
    total = sum(weights)
    norm = [w / total for w in weights]

    def fits(size: int) -> bool:
        return all(math.ceil(math.ceil(size * w) * (1 + MID_LEVEL_SURPLUS)) <= e for w, e in zip(norm, epochs))

    size = int(min(e / (1 + MID_LEVEL_SURPLUS) / w for w, e in zip(norm, epochs) if w > 0))
    while size > 0 and not fits(size):
        size -= 1
    return size


def sample_horizon(data_cfg: DataConfig, train_samples: int) -> int:
    """``max(train_samples, largest total that stays within one epoch of every dataset)``."""
    if data_cfg.mock:
        all_lengths = [_mock_lengths(data_cfg)]
    else:
        all_lengths = [sequence_lengths(p) for p in data_cfg.prefixes()]
    epochs = [one_epoch_samples(lengths, data_cfg.split, data_cfg.seq_length) for lengths in all_lengths]
    return max(int(train_samples), _largest_single_epoch_total(epochs, data_cfg.weights()))
