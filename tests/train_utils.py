"""Helpers for tests that run the training loop inside tests.harness processes."""

from __future__ import annotations

import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run_training(overrides: list, config: str = TINY) -> dict:
    """Load ``config`` with ``overrides``, train, and return losses + this rank's weights."""
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    cfg = load_config(config, overrides)
    result = train(cfg)
    weights = {}
    for i, chunk in enumerate(result.model_chunks):
        for k, v in chunk.module.state_dict().items():
            if torch.is_tensor(v) and not k.endswith("_extra_state"):
                weights[f"{i}.{k}"] = v.detach().clone()
    return {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "iteration": result.iteration,
        "resumed_from": result.resumed_from,
        "ignored": result.ignored_checkpoints,
        "exit_code": result.exit_code,
        "weights": weights,
    }
