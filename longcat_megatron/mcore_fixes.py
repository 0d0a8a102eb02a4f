"""Fixes for megatron-core 0.16.1 bugs hit by the local (non-TransformerEngine) layer spec.

These are not CPU-specific: they fail the same way on a GPU without TransformerEngine, which is how
CPU runs and GPU runs without TE build the model. With TE installed, megatron-core's TE spec is used
and none of these paths are reached. Each fix is tested in ``tests/test_cpu_compat.py``.
"""

from __future__ import annotations

import importlib.util

import torch

_APPLIED: list[str] = []


def have_transformer_engine() -> bool:
    """Whether a usable TransformerEngine is importable (never imported here)."""
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def fix_router_gemm_name() -> None:
    """``moe_utils.RouterGatingLinearFunction`` reads ``te_general_gemm``, which is bound only inside
    the TE try-import: every router forward raises NameError without TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def fix_mla_have_te() -> None:
    """``multi_latent_attention`` sets HAVE_TE from a MagicMock-backed import and then calls
    ``isinstance(x, TELinear)`` with the mock: TypeError without TE."""
    import megatron.core.transformer.multi_latent_attention as mla

    if not have_transformer_engine():
        mla.HAVE_TE = False


def fix_local_attention_kwargs() -> None:
    """MLA passes ``k_channels``/``v_channels`` to the local ``DotProductAttention``, which does not
    accept them; accept them and size the output by ``v_channels``."""
    from megatron.core.transformer import dot_product_attention as dpa

    orig = dpa.DotProductAttention.__init__
    if getattr(orig, "_longcat", False):
        return

    def init(self, *args, k_channels=None, v_channels=None, **kwargs):
        orig(self, *args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    init._longcat = True
    dpa.DotProductAttention.__init__ = init


def fix_torch_norm_sequence_parallel() -> None:
    """The local torch norm asserts ``not sequence_parallel``. Under SP the norm weights are
    replicated over TP and see different tokens per rank, so mark them ``sequence_parallel`` (their
    grads are then all-reduced over TP by ``finalize_model_grads``), exactly as TE norms do."""
    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(orig_new, "_longcat", False):
        return

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization={config.normalization!r}: use one of {sorted(kinds)}")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm

    new._longcat = True
    torch_norm.WrappedTorchNorm.__new__ = new


def fix_optimizer_state_restore() -> None:
    """Loading a distributed-optimizer checkpoint with torch Adam (no apex/TE fused Adam) copies
    every key of the param's state, ``step`` included: ``KeyError: 'step'`` for fully-reshardable
    checkpoints, and a silent reset of ``step`` (Adam's bias correction) for dp-reshardable ones; it
    also copies into fp32 main params that are views of leaf params without ``no_grad``. ``step`` is
    restored from the param groups by ``load_state_dict``, so skip it and copy under no_grad."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", False):
        return
    orig = dopt.DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(orig, "_longcat", False):
        return

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key != "step" and key in dst:
                    dst[key].copy_(value)

    set_states._longcat = True
    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


FIXES = (
    fix_router_gemm_name,
    fix_mla_have_te,
    fix_local_attention_kwargs,
    fix_torch_norm_sequence_parallel,
    fix_optimizer_state_restore,
)


def apply() -> list[str]:
    """Apply the no-TE fixes once; a no-op when TransformerEngine is present."""
    if _APPLIED or have_transformer_engine():
        return list(_APPLIED)
    for fn in FIXES:
        fn()
        _APPLIED.append(fn.__name__)
    return list(_APPLIED)
