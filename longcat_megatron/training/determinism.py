"""Deterministic computation (``train.deterministic: true``): the same seed gives bitwise the same run.

What it sets, in the process, before the process groups exist (NCCL reads its variables when a
communicator is created):

- ``torch.use_deterministic_algorithms(True)``: torch picks deterministic kernels and raises on an
  op that has none. This covers the project's own scatter-adds: the N-gram tables' gradient
  (``index_add_`` in ``model/ngram_embedding.py``) is deterministic on CUDA in this mode (torch
  documents ``index_add`` among the ops it makes deterministic); no other scatter-add exists in
  project code (tests/test_determinism.py keeps that true).
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: cuBLAS's deterministic workspace (torch raises without it).
- ``NCCL_ALGO=Ring`` (unless set): what Megatron-LM's ``--deterministic-mode`` asks for (it accepts
  Ring or Tree; NVLS/CollNet reductions are not reproducible).
- ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``: TransformerEngine's deterministic attention backward.
- cuDNN: ``deterministic=True``, ``benchmark=False``.
- megatron's ``TransformerConfig.deterministic_mode`` (set in training/setup.py).

The cost is speed (deterministic attention backward and reductions); the benefit is that a step
replayed on the same inputs gives the same bits, which the silent-data-corruption check
(training/sdc.py) relies on.
"""

from __future__ import annotations

import os

import torch

from longcat_megatron.config import ConfigError

# Environment set when deterministic mode is on (an operator's explicit setting wins, except where
# a value breaks determinism: then configure() raises).
ENVIRONMENT = {
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "NCCL_ALGO": "Ring",
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
}
_DETERMINISTIC_NCCL_ALGOS = ("Ring", "Tree")


def configure(enabled: bool) -> list:
    """Switch this process to deterministic kernels when ``enabled``; returns what it set, as
    ``["NAME=value", ...]`` lines for the start-up log. Call before the process groups exist."""
    if not enabled:
        return []
    algo = os.environ.get("NCCL_ALGO")
    if algo is not None and algo not in _DETERMINISTIC_NCCL_ALGOS:
        raise ConfigError(f"train.deterministic=true needs NCCL_ALGO to be one of "
                          f"{'/'.join(_DETERMINISTIC_NCCL_ALGOS)} (the environment has NCCL_ALGO={algo}): "
                          "unset it or set NCCL_ALGO=Ring")
    done = []
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
        done.append(f"{name}={os.environ[name]}")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    done.append("torch.use_deterministic_algorithms(True)")
    return done


def describe(enabled: bool) -> str:
    """The dry-run line for ``train.deterministic``."""
    if not enabled:
        return ("deterministic: off (train.deterministic=false: fastest kernels; a replayed step may "
                "differ in its last bits)")
    return ("deterministic: on (" + ", ".join(f"{k}={v}" for k, v in ENVIRONMENT.items())
            + ", torch deterministic algorithms, megatron deterministic_mode)")
