"""``--verify``: logits of our model (loaded from the megatron checkpoint) vs the exported HF model.

Loads both sides on CPU in fp32 (a single process, world size 1), runs fixed prompts and reports
max abs / max relative error and top-1 agreement. By default the whole model; with ``layers=K``
(``--verify-layers K``) only a slice: the embedding, the first K shortcut layers, the final norm and
the LM head on both sides (MTP left out), so large models can be checked on an ordinary host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_PROMPT_SEED = 1234


@dataclass
class VerifyReport:
    max_abs: float
    max_rel: float
    top1_agreement: float
    tokens: int
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.rtol and self.top1_agreement == 1.0

    def describe(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        return (f"verify {status}: {self.tokens} tokens, max abs err {self.max_abs:.3e}, max rel err "
                f"{self.max_rel:.3e} (limit {self.rtol:.0e}), top-1 agreement {self.top1_agreement:.2%}")


def fixed_prompts(vocab_size: int, batch: int = 2, length: int = 16, eos: Optional[int] = 2) -> torch.Tensor:
    """Deterministic prompts; the second one holds an EOS (exercises the N-gram reset)."""
    g = torch.Generator().manual_seed(DEFAULT_PROMPT_SEED)
    ids = torch.randint(3, vocab_size, (batch, length), generator=g)
    if eos is not None and batch > 1:
        ids[1, length // 2] = eos
    return ids


def load_megatron_model(load: str, iteration: Optional[int] = None, layers: Optional[int] = None):
    """Our LongCat model (TP=PP=EP=1, fp32) with the checkpoint's weights, in this process; with
    ``layers`` only the first that many shortcut layers (and no MTP)."""
    import dataclasses

    from megatron.core import dist_checkpointing

    from ckpt_convert.dcp_reader import resolve_checkpoint_dir
    from ckpt_convert.saved_config import load_model_config
    from longcat_megatron import runtime
    from longcat_megatron.model.factory import build_model_chunk, transformer_config

    iter_dir, _ = resolve_checkpoint_dir(load, iteration)
    cfg = load_model_config(iter_dir)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=min(layers, cfg.num_layers), mtp_num_layers=0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not torch.distributed.is_initialized():
        from ckpt_convert.parallel_launch import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
    runtime.initialize(num_experts=cfg.num_experts)
    model = build_model_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
    model.load_state_dict(loaded["model"], strict=False)
    return model.eval(), cfg


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, None, None).float()


def hf_logits(hf_dir: str, ids: torch.Tensor, layers: Optional[int] = None) -> torch.Tensor:
    """Logits of the exported model (its first ``layers`` shortcut layers when given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=True)
    if layers is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the unloaded layers are reported as unexpected keys
        config.num_layers = min(layers, config.num_layers)
        config.num_hidden_layers = 2 * config.num_layers  # two attention blocks per shortcut layer
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, trust_remote_code=True,
                                                 dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits.float()


def compare(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> VerifyReport:
    diff = (ours - ref).abs()
    return VerifyReport(
        max_abs=float(diff.max()), max_rel=float(diff.max() / ref.abs().max().clamp_min(1e-30)),
        top1_agreement=float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
        tokens=ref.shape[0] * ref.shape[1], rtol=rtol,
    )


def verify_export(load: str, hf_dir: str, iteration: Optional[int] = None, rtol: float = 1e-5,
                  layers: Optional[int] = None) -> VerifyReport:
    """Compare logits of the megatron checkpoint and the exported HF directory on fixed prompts
    (whole models, or the slice of the first ``layers`` shortcut layers)."""
    model, cfg = load_megatron_model(load, iteration, layers)
    ng = getattr(cfg, "ngram", None)
    ids = fixed_prompts(cfg.vocab_size, eos=getattr(ng, "eos_token_id", 2) if ng else 2)
    ours = megatron_logits(model, ids)
    ref = hf_logits(hf_dir, ids, layers)
    return compare(ours, ref, rtol)
