"""Dataset fingerprints: what a checkpoint's data position is only valid for.

A checkpoint stores ``consumed_train_samples`` plus the fingerprint of the data it was trained on.
The sample order megatron-core builds depends on the dataset files, blend weights, split, sequence
length, seed and the number of samples built (the *sample horizon*, at least one epoch: see
:mod:`longcat_megatron.data.horizon`; it changes only when a run grows past one epoch of some
dataset, so extending ``train_iters`` normally keeps the fingerprint), so all of these are part of
the fingerprint. On resume :func:`check_fingerprint` refuses a different fingerprint unless
the operator explicitly allows the change. The data-parallel size is *not* part of it: the global
sample order does not depend on it.

Dataset files are identified by content (document/token counts, dtype and a digest of sampled ``.idx``
blocks), not by path, so moving or copying data keeps a checkpoint resumable.
"""

from __future__ import annotations

import logging
import os

from longcat_megatron.data.config import DataConfig
from longcat_megatron.data.horizon import sample_horizon
from longcat_megatron.data.indexed_files import check_indexed_pair, sampled_digest
from longcat_megatron.errors import UserInputError

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
# Keys recorded for the operator's information only; never compared.
_INFORMATIONAL_KEYS = ("paths",)


class DataFingerprintError(UserInputError):
    """Resuming against different data; the message lists every difference and the override."""


def _describe_blend(data_cfg: DataConfig) -> tuple[list, list]:
    """(content description per prefix, absolute paths) of ``data.paths``."""
    prefixes, weights = data_cfg.prefixes(), data_cfg.weights()
    entries, where = [], []
    for i, prefix in enumerate(prefixes):
        summary = check_indexed_pair(prefix)
        entries.append({
            "name": os.path.basename(prefix),
            "weight": None if weights is None else weights[i],
            "documents": summary["documents"],
            "tokens": summary["tokens"],
            "dtype": summary["dtype"],
            "idx_digest": sampled_digest(prefix + ".idx"),
        })
        where.append(os.path.abspath(prefix))
    return entries, where


def dataset_fingerprint(data_cfg: DataConfig, *, seed: int, train_samples: int) -> dict:
    """JSON-serialisable description of the training data order (see module docstring)."""
    fp: dict = {
        "version": FINGERPRINT_VERSION,
        "mock": bool(data_cfg.mock),
        "sft": bool(data_cfg.sft),
        "seq_length": int(data_cfg.seq_length),
        "split": data_cfg.split,
        "seed": int(seed),
        "paths": [],
    }
    if not data_cfg.sft:  # packed SFT order is prefix-stable in the run length; GPTDataset's is not
        fp["sample_horizon"] = sample_horizon(data_cfg, train_samples)
    if data_cfg.mock:
        fp["mock_vocab_size"] = int(data_cfg.mock_vocab_size)
    else:
        fp["datasets"], fp["paths"] = _describe_blend(data_cfg)
    return fp


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in _INFORMATIONAL_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, name + ".")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, dict) and isinstance(y, dict):
                    diffs += _differences(x, y, f"{name}[{i}].")
                elif x != y:
                    diffs.append(f"{name}[{i}]: checkpoint {x!r}, now {y!r}")
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return diffs


def check_fingerprint(saved: dict, current: dict, allow_change: bool) -> None:
    """Raise :class:`DataFingerprintError` naming every difference unless ``allow_change``.

    With ``allow_change`` the differences are logged as a warning and training continues from the
    saved sample position in the *new* data order.
    """
    diffs = _differences(saved or {}, current)
    if not diffs:
        return
    text = "; ".join(diffs)
    if allow_change:
        logger.warning("data changed since the checkpoint (allowed by the operator): %s", text)
        return
    raise DataFingerprintError(
        "the training data differ from the checkpoint's, so the saved data position would point at "
        f"different samples: {text}. Restore the original data settings, or pass the explicit "
        "override to resume anyway in the new order."
    )
