"""Pretraining data for the training loop, through megatron-core's dataset machinery.

``build_pretrain_iterators`` builds ``GPTDataset``s (or ``MockGPTDataset`` when ``data.mock``) with
``BlendedMegatronDatasetBuilder``: a weighted blend of indexed-dataset prefixes, split into train and
valid parts by ``data.split``, packed into ``seq_length + 1`` token windows across document
boundaries (megatron's sample index); within one epoch of every dataset the order does not depend on
the run length (:mod:`longcat_megatron.data.horizon`). The train iterator reads global samples
``consumed_train_samples, ...`` in Megatron-LM's ``MegatronPretrainingSampler`` order
(:mod:`longcat_megatron.data.sampler`), so resume is O(1) and the order does not depend on the
data-parallel size.

Batches are dicts of CPU tensors: ``tokens``/``labels``/``position_ids`` int64 ``[mbs, seq]``,
``loss_mask`` float32 ``[mbs, seq]``, and as ``attention_mask`` a
:class:`~longcat_megatron.model.document_mask.DocumentMask` (where each document starts, no dense
``[seq, seq]`` mask) when ``data.reset_attention_mask`` asks for document masking, else ``None``
(plain causal). A document starts after every EOD token, megatron's ``reset_attention_mask`` rule.

Every rank may call it; when ``torch.distributed`` is initialised it must be called by *all* ranks
(megatron builds the index cache on rank 0 first, behind a barrier).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator, Optional

import torch

from longcat_megatron.data.config import DataConfig, DataConfigError
from longcat_megatron.data.fingerprint import check_fingerprint, dataset_fingerprint  # noqa: F401 (API)
from longcat_megatron.data.horizon import MID_LEVEL_SURPLUS
from longcat_megatron.data.check import check_data
from longcat_megatron.data.mcore_helpers import ensure_dataset_helpers
from longcat_megatron.data.sampler import check_batch_layout, micro_batch_indices
from longcat_megatron.data.tokenizer import resolve_eod_token_id
from longcat_megatron.model.document_mask import DocumentMask, starts_after_eod

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


class _SpecialTokens:
    """The few tokenizer facts megatron-core's GPTDataset reads (EOD, vocab size, no pad token)."""

    def __init__(self, eod: int, vocab_size: Optional[int]):
        self.eod = eod
        self.eos = eod
        self.vocab_size = vocab_size
        # Part of megatron's index-cache key (it JSON-dumps ``tokenizer.unique_identifiers``).
        self.unique_identifiers = {"class": "SpecialTokens", "eod": eod, "vocab_size": vocab_size}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def index_cache_dir(data_cfg: DataConfig, prefixes: list[str]) -> Optional[str]:
    """Where megatron-core caches sample/blend indices (``data.cache_dir``, else next to the data)."""
    if data_cfg.mock:
        return None
    if not _distributed():
        # megatron's BlendedDataset needs torch.distributed to use a cache; single-process callers
        # (tools, tests) build the blend indices in memory and GPTDataset uses its default cache.
        return None
    if data_cfg.cache_dir:
        return data_cfg.cache_dir
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")


def gpt_dataset_config(data_cfg: DataConfig, *, seed: int, blend: Optional[list] = None):
    """megatron-core ``GPTDatasetConfig`` for a data config (``blend`` defaults to ``data.paths``)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    paths = data_cfg.paths if blend is None else blend
    cfg = DataConfig(paths=list(paths))
    mcore_blend = None if data_cfg.mock else (cfg.prefixes(), cfg.weights())
    eod = int(data_cfg.eod_token_id) if data_cfg.mock else resolve_eod_token_id(data_cfg)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data_cfg.seq_length,
        blend=mcore_blend,
        split=data_cfg.split,
        path_to_cache=index_cache_dir(data_cfg, cfg.prefixes()),
        tokenizer=_SpecialTokens(eod, data_cfg.mock_vocab_size if data_cfg.mock else None),
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        # Document masking travels as document starts (DocumentsAfterEod), never a dense mask.
        create_attention_mask=False,
        mid_level_dataset_surplus=MID_LEVEL_SURPLUS,
    )


def build_gpt_datasets(data_cfg: DataConfig, *, seed: int, train_samples: int, eval_samples: int):
    """(train, valid) megatron-core datasets; valid is None when the split gives it nothing."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    data_cfg.validate()
    if data_cfg.sft:
        raise DataConfigError("data.sft=true: packed chat data is read by longcat_megatron.data.sft."
                              "build_sft_iterators, not build_pretrain_iterators")
    ensure_dataset_helpers()
    check_data(data_cfg)
    config = gpt_dataset_config(data_cfg, seed=seed)
    cls = MockGPTDataset if data_cfg.mock else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [train_samples, eval_samples, 0], lambda: True, config
    ).build()
    if train is None or len(train) < train_samples:
        raise DataConfigError(
            f"data: the train split holds {0 if train is None else len(train)} samples of "
            f"{data_cfg.seq_length + 1} tokens but {train_samples} were asked for; check data.split"
        )
    if data_cfg.reset_attention_mask:
        train = DocumentsAfterEod(train, config.tokenizer.eod)
        valid = None if valid is None else DocumentsAfterEod(valid, config.tokenizer.eod)
    return train, valid


class DocumentsAfterEod:
    """A dataset whose samples also carry ``document_starts``: 0 and the position after every EOD
    token of ``tokens`` (where megatron's ``reset_attention_mask`` starts a new document)."""

    def __init__(self, dataset, eod_token_id: int):
        self.dataset, self.eod_token_id = dataset, int(eod_token_id)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        sample = dict(self.dataset[idx])
        sample["document_starts"] = starts_after_eod(sample["tokens"], self.eod_token_id)
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch dict; ``attention_mask`` is a ``DocumentMask`` when the samples
    carry ``document_starts``, else None (plain causal)."""
    batch = {
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),
        "labels": torch.stack([s["labels"] for s in samples]).long(),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
        "position_ids": torch.stack([s["position_ids"] for s in samples]).long(),
        "attention_mask": None,
    }
    if "document_starts" in samples[0]:
        batch["attention_mask"] = DocumentMask.from_starts(
            [s["document_starts"].tolist() for s in samples], batch["tokens"].shape[1])
    return batch


def iterate_micro_batches(
    dataset, *, start: int, stop: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[dict]:
    """This rank's micro-batches of global samples ``[start, stop)`` of ``dataset``."""
    for indices in micro_batch_indices(
        start=start, stop=stop, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
    ):
        yield collate([dataset[i] for i in indices])


def build_pretrain_iterators(
    data_cfg: DataConfig,
    *,
    seed: int,
    micro_batch_size: int,
    global_batch_size: int,
    train_samples: int,
    eval_samples: int,
    dp_rank: int,
    dp_size: int,
    consumed_train_samples: int,
) -> tuple[Iterator[dict], Callable[[], Iterator[dict]] | None]:
    """(train iterator from ``consumed_train_samples``, factory of fresh eval iterators or None)."""
    check_batch_layout(micro_batch_size, global_batch_size, dp_rank, dp_size)
    train, valid = build_gpt_datasets(
        data_cfg, seed=seed, train_samples=train_samples, eval_samples=eval_samples
    )
    return make_iterators(
        train, valid, micro_batch_size=micro_batch_size, train_samples=train_samples,
        eval_samples=eval_samples, dp_rank=dp_rank, dp_size=dp_size, consumed=consumed_train_samples,
    )


def make_iterators(train, valid, *, micro_batch_size, train_samples, eval_samples, dp_rank, dp_size, consumed):
    """(train iterator from global sample ``consumed``, eval-iterator factory or None) for this rank."""
    layout = dict(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    train_iter = iterate_micro_batches(train, start=consumed, stop=train_samples, **layout)
    if eval_samples <= 0 or valid is None or len(valid) == 0:
        if eval_samples > 0:
            logger.warning("data: the valid split is empty; evaluation is skipped (check data.split)")
        return train_iter, None
    stop = min(eval_samples, len(valid))

    def eval_iterator() -> Iterator[dict]:
        return iterate_micro_batches(valid, start=0, stop=stop, **layout)

    return train_iter, eval_iterator
