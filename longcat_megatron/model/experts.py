"""The local FFN experts of the MoE: one implementation per ``model.expert_impl``.

* ``sequential`` — megatron-core's ``SequentialMLP``: one SwiGLU ``MLP`` (two small GEMMs) per local
  expert, looped. The reference.
* ``grouped`` — :class:`GroupedSwiGLUExperts`: all local experts as two grouped matrix products
  (``torch._grouped_mm``: CPU fp32/bf16, Hopper GPUs) in one autograd node with a hand-written
  backward (four more grouped products). Its parameters are the ``SequentialMLP`` ones
  (``local_experts.{i}.linear_fc1.weight`` ``[2F, H]`` = [gate; up],
  ``local_experts.{i}.linear_fc2.weight`` ``[H, F]``), so plain and distributed checkpoints, HF
  conversion and ``parallel_slicing`` are the same for both. The per-expert parameters are views
  of one ``[E, 2F, H]`` / ``[E, H, F]`` storage, read in place by the grouped kernel; where a wrapper
  has moved them apart (megatron's distributed-optimizer buffers) a GPU stacks a transient copy
  (never saved for backward) and a CPU loops over the experts (torch's CPU grouped kernel loops over
  the groups itself; copying all expert weights on every call cost more than it saved here).
* ``te`` — megatron-core's ``TEGroupedMLP`` (TransformerEngine grouped linear, GPU only; imported
  only when chosen). Its state dict is mapped onto the same ``local_experts.{i}`` keys.

Selective recompute: when the TransformerConfig has ``recompute_granularity="selective"`` with
``"moe_act"`` in ``recompute_modules``, the grouped experts do not keep the SwiGLU output ``[T, F]``
for backward and recompute it from the fc1 output (bitwise the same gradients); SequentialMLP's
megatron ``MLP`` has no such hook, so ``sequential`` ignores the setting (it is the reference).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from longcat_megatron.model.config import EXPERT_IMPLS, ModelConfigError


def recompute_moe_act(tf_config) -> bool:
    """Whether the config asks for recomputation of the expert activation (megatron's rule)."""
    return (getattr(tf_config, "recompute_granularity", None) == "selective"
            and "moe_act" in (getattr(tf_config, "recompute_modules", None) or []))


# ------------------------------------------------------------------------------ grouped products
_GROUPED_MM_OK: dict = {}


def _aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm wants every non-unit stride (in bytes) to be a multiple of 16."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16:
            return False
        for dim, stride in zip(t.shape, t.stride()):
            if dim > 1 and stride != 1 and (stride * size) % 16:
                return False
    return True


def _kernel(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> Optional[torch.Tensor]:
    """``torch._grouped_mm(a, b, offs=offs)`` where the kernel takes these strides/dtype, else None."""
    key = (a.device.type, a.dtype)
    if not (_GROUPED_MM_OK.get(key, True) and _aligned(a, b)):
        return None
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except torch.OutOfMemoryError:
        raise                         # memory, not the kernel: do not fall back for good
    except RuntimeError:
        _GROUPED_MM_OK[key] = False   # e.g. a GPU/dtype the kernel does not cover
        return None


def stacked_view(params: list) -> Optional[torch.Tensor]:
    """``[E, *shape]`` view of equally shaped, contiguous ``params`` that lie evenly spaced in
    expert order in one storage (no copy), or None."""
    first = params[0]
    if not first.is_contiguous() or any(
            p.shape != first.shape or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            for p in params):
        return None
    if len(params) == 1:
        return first.unsqueeze(0)
    step = params[1].storage_offset() - first.storage_offset()
    if step < first.numel() or any(p.storage_offset() != first.storage_offset() + i * step
                                   for i, p in enumerate(params)):
        return None
    return first.as_strided((len(params), *first.shape), (step, *first.stride()))


def expert_weights(params: list):
    """The local experts' weights for the grouped products: a zero-copy ``[E, ...]`` view where
    the parameters allow it, a stacked copy on GPU (the grouped kernel pays for it), else the list
    (CPU: torch's grouped kernel loops over the groups too; the copy costs more than it saves)."""
    view = stacked_view(params)
    if view is not None:
        return view
    return torch.stack(params) if params[0].is_cuda else list(params)


def grouped_rows(a: torch.Tensor, w, offs: torch.Tensor, counts: list,
                 transpose: bool) -> torch.Tensor:
    """Rows of ``a [T, K]`` of group e times ``w[e]`` (``w[e].T`` if ``transpose``) -> ``[T, N]``."""
    if torch.is_tensor(w):
        out = _kernel(a, w.transpose(1, 2) if transpose else w, offs)
        if out is not None:
            return out
    parts = [x @ (we.t() if transpose else we) for x, we in zip(torch.split(a, counts), w)]
    n = w[0].shape[0 if transpose else 1]
    return torch.cat(parts) if parts else a.new_empty(0, n)


def grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor,
                        counts: list) -> torch.Tensor:
    """``[E, N, K]``: per group e, ``dy_e.T @ x_e`` for ``dy [T, N]``, ``x [T, K]``."""
    out = _kernel(dy.t(), x, offs)
    if out is not None:
        return out
    return torch.stack([d.t() @ xe for d, xe in zip(torch.split(dy, counts), torch.split(x, counts))])


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


class _GroupedSwiGLU(torch.autograd.Function):
    """``y = fc2_e((silu(g) * u) * p)`` with ``[g; u] = fc1_e(x)`` for the rows of expert ``e``."""

    @staticmethod
    def forward(ctx, x, probs, counts, recompute_act, n_experts, *weights):
        w1s, w2s = list(weights[:n_experts]), list(weights[n_experts:])
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        h = grouped_rows(x, expert_weights(w1s), offs, counts, transpose=True)       # [T, 2F]
        act = _swiglu(h)
        inter = (act * probs.unsqueeze(-1)).to(act.dtype)
        y = grouped_rows(inter, expert_weights(w2s), offs, counts, transpose=True)   # [T, H]
        ctx.counts, ctx.n_experts, ctx.recompute_act = counts, n_experts, recompute_act
        ctx.save_for_backward(x, probs, h, offs, *([] if recompute_act else [act]), *weights)
        return y

    @staticmethod
    def backward(ctx, dy):
        n, counts = ctx.n_experts, ctx.counts
        x, probs, h, offs, *rest = ctx.saved_tensors
        act = _swiglu(h) if ctx.recompute_act else rest.pop(0)
        w1s, w2s = rest[:n], rest[n:]
        dy = dy.contiguous()
        inter = (act * probs.unsqueeze(-1)).to(act.dtype)
        d_inter = grouped_rows(dy, expert_weights(w2s), offs, counts, transpose=False)  # [T, F]
        dw2 = grouped_weight_grad(dy, inter, offs, counts)                             # [E, H, F]
        d_scaled = d_inter.to(torch.promote_types(act.dtype, probs.dtype))
        d_probs = (d_scaled * act).sum(-1).to(probs.dtype)
        d_act = (d_scaled * probs.unsqueeze(-1)).to(act.dtype)
        gate, up = torch.chunk(h, 2, dim=-1)
        sig = torch.sigmoid(gate)
        d_gate = d_act * up * (sig * (1 + gate * (1 - sig)))
        d_up = d_act * (gate * sig)
        dh = torch.cat([d_gate, d_up], dim=-1)                                         # [T, 2F]
        dx = grouped_rows(dh, expert_weights(w1s), offs, counts, transpose=False)      # [T, H]
        dw1 = grouped_weight_grad(dh, x, offs, counts)                                 # [E, 2F, H]
        return (dx, d_probs, None, None, None, *dw1.unbind(0), *dw2.unbind(0))


class GroupedSwiGLUExperts(SequentialMLP):
    """All local SwiGLU experts as grouped GEMMs; same parameters and state dict as SequentialMLP.

    Expert linears are purely local under expert parallelism (the token dispatcher does the
    expert-tensor-parallel gather/reduce-scatter), so this is exact at any EP x ETP.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        problems = [name for name, bad in (
            ("gated_linear_unit=False", not config.gated_linear_unit),
            ("activation is not SiLU", config.activation_func is not F.silu),
            ("add_bias_linear=True", config.add_bias_linear),
            ("moe_apply_probs_on_input=True", config.moe_apply_probs_on_input),
            ("fp8/fp4", bool(config.fp8 or config.fp4)),
        ) if bad]
        if problems:
            raise ModelConfigError("model.expert_impl=grouped supports bias-free SwiGLU experts only "
                             f"({', '.join(problems)}); use model.expert_impl=sequential")
        self.recompute_act = recompute_moe_act(config)
        self._share_storage()

    def _share_storage(self) -> None:
        """One storage per weight kind, experts in order, so that the grouped products read the
        weights in place (:func:`expert_weights`). Redone after ``.cuda()`` / ``.bfloat16()``;
        wrappers that move parameters into their own buffers (megatron's distributed-optimizer
        DDP) undo it, and then a GPU stacks a copy and a CPU loops."""
        for name in ("linear_fc1", "linear_fc2"):
            params = [getattr(e, name).weight for e in self.local_experts]
            if stacked_view(params) is None:
                stacked = torch.stack([p.data for p in params])
                for p, view in zip(params, stacked.unbind(0)):
                    p.data = view

    def _apply(self, fn, *args, **kwargs):
        # Re-share only what was shared: parameters a wrapper has placed in its own buffers stay.
        shared = stacked_view([e.linear_fc1.weight for e in self.local_experts]) is not None
        out = super()._apply(fn, *args, **kwargs)
        if shared:
            self._share_storage()
        return out

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        counts = [int(c) for c in (tokens_per_expert.tolist()
                                   if torch.is_tensor(tokens_per_expert) else tokens_per_expert)]
        weights = [e.linear_fc1.weight for e in self.local_experts]
        weights += [e.linear_fc2.weight for e in self.local_experts]
        x = permuted_local_hidden_states
        out = _GroupedSwiGLU.apply(x.reshape(-1, x.shape[-1]), permuted_probs.reshape(-1), counts,
                                   self.recompute_act, self.num_local_experts, *weights)
        return out.view(*x.shape[:-1], out.shape[-1]), None


# ----------------------------------------------------------------------- TransformerEngine (GPU)
_TE_KEY = re.compile(r"^(?P<pre>.*)linear_fc(?P<fc>[12])\.weight(?P<e>\d+)$")
_SEQ_KEY = re.compile(r"^(?P<pre>.*)local_experts\.(?P<e>\d+)\.linear_fc(?P<fc>[12])\.weight$")


def _te_to_sequential_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _TE_KEY.match(key[len(prefix):])
        if m:
            state_dict[f"{prefix}{m['pre']}local_experts.{m['e']}.linear_fc{m['fc']}.weight"] = \
                state_dict.pop(key)
    return state_dict


def _sequential_to_te_keys(state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _SEQ_KEY.match(key[len(prefix):])
        if m:
            state_dict[f"{prefix}{m['pre']}linear_fc{m['fc']}.weight{m['e']}"] = state_dict.pop(key)


def _te_experts_class():
    """megatron-core's TEGroupedMLP with its plain state dict keyed like SequentialMLP."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    class TEGroupedSwiGLUExperts(TEGroupedMLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._register_state_dict_hook(_te_to_sequential_keys)
            self._register_load_state_dict_pre_hook(_sequential_to_te_keys)

    return TEGroupedSwiGLUExperts


def experts_spec(impl: str, num_experts: int):
    """The ModuleSpec for the MoE's ``experts`` submodule with implementation ``impl``."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    if impl not in EXPERT_IMPLS:
        raise ModelConfigError(f"model.expert_impl={impl!r}: use one of {', '.join(EXPERT_IMPLS)}")
    if impl == "te":
        if not torch.cuda.is_available():
            raise ModelConfigError("model.expert_impl=te needs TransformerEngine on a CUDA GPU; "
                             "use model.expert_impl=grouped on CPU")
        try:
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        except ImportError as e:   # pragma: no cover - depends on the install
            raise ModelConfigError("model.expert_impl=te: TransformerEngine is not installed "
                             f"({e}); use model.expert_impl=grouped") from e
        spec = get_moe_module_spec_for_backend(TESpecProvider(), num_experts=num_experts,
                                               moe_grouped_gemm=True).submodules.experts
        spec.module = _te_experts_class()
        return spec
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(),
                                           num_experts=num_experts).submodules.experts
    if impl == "grouped":
        spec.module = GroupedSwiGLUExperts
    return spec


def local_expert_weights(module: torch.nn.Module) -> Optional[tuple[list, list]]:
    """(fc1 weights, fc2 weights) of the local experts, one tensor per expert in local order
    (``[2F, H]`` = [gate; up] and ``[H, F]``, this rank's expert-tensor shard), for an experts module
    of any ``model.expert_impl``; None for other modules."""
    impl = expert_impl_of(module)
    if impl is None:
        return None
    if impl == "te":
        n = module.num_local_experts
        return ([getattr(module.linear_fc1, f"weight{e}") for e in range(n)],
                [getattr(module.linear_fc2, f"weight{e}") for e in range(n)])
    return ([e.linear_fc1.weight for e in module.local_experts],
            [e.linear_fc2.weight for e in module.local_experts])


def expert_impl_of(module: torch.nn.Module) -> Optional[str]:
    """The ``model.expert_impl`` name of an experts module (for logs and tests)."""
    if isinstance(module, GroupedSwiGLUExperts):
        return "grouped"
    if type(module) is SequentialMLP:
        return "sequential"
    return "te" if type(module).__name__ == "TEGroupedSwiGLUExperts" else None
