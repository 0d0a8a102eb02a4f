"""Fixes for megatron-core 0.16.1 bugs.

``ALWAYS`` (applied with and without TransformerEngine): the distributed optimizer's bugs with an
fp32 parameter in a bf16 model, its fully-reshardable save with more than one DDP bucket, and the
optimizer-state restore that must not depend on which Adam (torch, TE or Apex FusedAdam) is present.
``FIXES`` (applied only without TransformerEngine): bugs of the local (non-TE) layer spec, which CPU
runs and GPU runs without TE use; with TE, megatron-core's TE spec never reaches those paths. Each
fix names the test that covers it (most are in ``tests/test_cpu_compat.py``).
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
    """megatron's distributed-optimizer restore (``_set_main_param_and_optimizer_states``) copies
    every key of the parameter's current optimizer state from the loaded tensors, ``step`` included,
    and without ``no_grad``. The checkpoint never holds a per-param ``step`` (megatron keeps it in
    the param groups), so any ``step`` in the state is ``KeyError: 'step'`` (fully-reshardable) or a
    silent reset of Adam's bias correction (dp-reshardable, which saves it); and the copy into fp32
    main params that are views of leaf params needs ``no_grad``. Restore the state's own keys but
    ``step`` (``load_state_dict`` restores it from the param groups, for torch Adam and FusedAdam
    alike) under no_grad; a key the checkpoint lacks is an error naming it.

    Not tied to the layer spec or to which Adam is installed: applied always (``ALWAYS``), also with
    TransformerEngine or apex, whose FusedAdam states hold no ``step`` but whose restore is the same
    code. Tested with torch Adam (tests/test_resume.py) and a simulated FusedAdam
    (tests/test_fused_adam_resume.py)."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    orig = dopt.DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(orig, "_longcat", False):
        return

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        missing = sorted(k for k in dst if k != "step" and k not in tensors)
        if missing:
            raise KeyError(f"the checkpoint's optimizer state of a parameter lacks {missing} "
                           f"(it holds {sorted(tensors)})")
        with torch.no_grad():
            for key, value in dst.items():
                if key != "step":
                    value.copy_(tensors[key])

    set_states._longcat = True
    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def fix_mixed_dtype_param_order() -> None:
    """The distributed optimizer maps each model param to ``(group, order)`` in range order, then
    rebuilds each group's params as ``[fp32 params, fp32 copies of 16-bit params]``: with both kinds
    in one group (an fp32 parameter in a bf16 model, such as the LongCat router weight) the map points
    at other params' states and the fully-reshardable save fails. Recompute the map in the real order.
    Not TE-specific: applied on every device. Tested by tests/test_bf16_router.py (save and bitwise
    resume of a bf16 model with the fp32 router weight)."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    orig = dopt.DistributedOptimizer.__init__
    if getattr(orig, "_longcat", False):
        return

    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        index = {}
        for group_index, group_range in enumerate(self.opt_group_ranges):
            params = group_range["params"]
            ordered = ([p for p in params if p.dtype == torch.float32]
                       + [p for p in params if p.dtype != torch.float32])
            for order, param in enumerate(ordered):
                index[param] = (group_index, order)
        self.model_param_group_index_map = index

    init._longcat = True
    dopt.DistributedOptimizer.__init__ = init


def fix_mixed_dtype_float16_optimizer_state() -> None:
    """The same bug in the non-distributed bf16 optimizer: its ``sharded_state_dict`` numbers the
    model params by enumerating only the 16-bit ones, while the optimizer state numbers all params of
    the groups; with an fp32 param among them, states land on the wrong tensors ("Optimizer shape
    does not match model shape"). Number them in the optimizer's own order."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params as F16

    if getattr(F16.sharded_state_dict, "_longcat", False):
        return

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        model_of = {id(main): model for f16, f32 in zip(self.float16_groups, self.fp32_from_float16_groups)
                    for model, main in zip(f16, f32)}
        # The optimizer's params in state-id order, each 16-bit param standing for its fp32 copy.
        ordered = [model_of.get(id(p), p) for g in self.optimizer.param_groups for p in g["params"]]
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, ordered)
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_map[pid], p, prefix="optimizer.state.fp32_param")
             for pid, p in zip(state_group["params"], group["params"]) if id(p) in model_of]
            for group, state_group in zip(self.optimizer.param_groups,
                                          state_dict["optimizer"]["param_groups"])
        ]
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], id_map, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict

    sharded_state_dict._longcat = True
    F16.sharded_state_dict = sharded_state_dict


def fix_fully_reshardable_bucket_padding() -> None:
    """The ``fully_reshardable`` optimizer save slices each parameter's state out of a "world"
    tensor that ``get_parameter_state_dp_zero`` builds with the padding at the end of every DDP
    bucket removed, but at the parameter's position in the *padded* buffer
    (``buffer.param_index_map``). With one bucket the two agree; with several (any run with
    ``overlap_grad_reduce``: megatron's default bucket is 40M parameters) every parameter after the
    first bucket is saved with another parameter's main weights and Adam moments, and the last ones
    partly as zeros ("param range exceeds unpadded buffer"): a resume trains on, silently, from
    corrupted optimizer state. Slice at the unpadded positions instead (save only; the load side
    reads per-parameter tensors and is right). Tested by tests/test_recipe_rehearsal.py (bitwise
    resume with many buckets) and tests/test_optimizer_gather.py (every gather, many buckets)."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    orig = dopt.DistributedOptimizer.sharded_param_state_fully_reshardable
    if getattr(orig, "_longcat", False):
        return

    def unpadded_index_map(buffer) -> dict:
        shift, kept, out = [], 0, {}
        for bucket in buffer.buckets:
            shift.append(bucket.offset - kept)   # end-of-bucket padding before this bucket
            kept += bucket.numel_unpadded
        for param, (start, end, bucket_id) in buffer.param_index_map.items():
            out[param] = (start - shift[bucket_id], end - shift[bucket_id], bucket_id)
        return out

    def sharded_param_state(self, *args, **kwargs):
        saved = [buffer.param_index_map for buffer in self.buffers]
        try:
            for buffer in self.buffers:
                buffer.param_index_map = unpadded_index_map(buffer)
            return orig(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, saved):
                buffer.param_index_map = index_map

    sharded_param_state._longcat = True
    dopt.DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state


# Applied with and without TransformerEngine (megatron bugs not tied to the local spec).
ALWAYS = (fix_mixed_dtype_param_order, fix_mixed_dtype_float16_optimizer_state,
          fix_fully_reshardable_bucket_padding, fix_optimizer_state_restore)

FIXES = (
    fix_router_gemm_name,
    fix_mla_have_te,
    fix_local_attention_kwargs,
    fix_torch_norm_sequence_parallel,
)


def apply() -> list[str]:
    """Apply the fixes once: ``ALWAYS``, then ``FIXES`` unless TransformerEngine is present."""
    if _APPLIED:
        return list(_APPLIED)
    for fn in ALWAYS:
        fn()
        _APPLIED.append(fn.__name__)
    if have_transformer_engine():
        return list(_APPLIED)
    for fn in FIXES:
        fn()
        _APPLIED.append(fn.__name__)
    return list(_APPLIED)
