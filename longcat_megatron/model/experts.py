"""The local FFN experts of the MoE: one implementation per ``model.expert_impl``.

* ``sequential`` — megatron-core's ``SequentialMLP``: one SwiGLU ``MLP`` (two small GEMMs) per local
  expert, looped. The reference.
* ``grouped`` — :class:`GroupedSwiGLUExperts`: all local experts as two grouped matrix products
  (``torch._grouped_mm``: CPU fp32/bf16, Hopper GPUs) in one autograd node with a hand-written
  backward (four more grouped products). Its weights are two stacked parameters, ``weight1
  [E, 2F, H]`` (per expert [gate; up]) and ``weight2 [E, H, F]``, read in place by the kernel
  wherever a wrapper places them (no per-step copy) and with stacked gradients. Its plain state
  dict and its distributed checkpoint layout are SequentialMLP's (``local_experts.{i}.linear_fc1
  .weight`` ``[2F, H]``, ``local_experts.{i}.linear_fc2.weight`` ``[H, F]``), so checkpoints, HF
  conversion and ``parallel_slicing`` are the same for every implementation. The group offsets
  reach the GPU without a blocking host copy (:func:`group_offsets`).
* ``te`` — megatron-core's ``TEGroupedMLP`` (TransformerEngine grouped linear, GPU only; imported
  only when chosen). Its state dict is mapped onto the same ``local_experts.{i}`` keys.

Initialisation (every implementation, :class:`DistinctInitExperts`): global expert g of layer l is
drawn from a random stream of its own, whole and then sliced to this rank's expert-tensor shard,
so experts are distinct on every EP rank and identical at any EP x ETP layout; building experts
draws nothing from the global random streams, so the rest of the model does not depend on EP.

Selective recompute: when the TransformerConfig has ``recompute_granularity="selective"`` with
``"moe_act"`` in ``recompute_modules``, the grouped experts do not keep the SwiGLU output ``[T, F]``
for backward and recompute it from the fc1 output (bitwise the same gradients); SequentialMLP's
megatron ``MLP`` has no such hook, so ``sequential`` ignores the setting (it is the reference).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import re
from dataclasses import replace
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from longcat_megatron.model.config import EXPERT_IMPLS, ModelConfigError


def recompute_moe_act(tf_config) -> bool:
    """Whether the config asks for recomputation of the expert activation (megatron's rule)."""
    return (getattr(tf_config, "recompute_granularity", None) == "selective"
            and "moe_act" in (getattr(tf_config, "recompute_modules", None) or []))


# ------------------------------------------------------------------------------ initialisation
def _rng_devices() -> list:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


_LAYER: contextvars.ContextVar = contextvars.ContextVar("longcat_expert_layer", default=0)


@contextlib.contextmanager
def building_layer(layer_number: int):
    """Experts built inside belong to decoder layer ``layer_number`` (their random streams)."""
    token = _LAYER.set(layer_number)
    try:
        yield
    finally:
        _LAYER.reset(token)


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class DistinctInitExperts:
    """Mixin for an experts module (before the megatron class in the bases): megatron builds the
    weights with a no-op init method (its init path still runs, so every parameter gets megatron's
    tensor-parallel attributes) and without drawing from the global random streams, so that the
    rest of the model's initialisation does not depend on the expert-parallel size; then
    :func:`reset_expert_parameters` draws every global expert from a stream of its own (layer: the
    enclosing :func:`building_layer`, seed: the global seed)."""

    def __init__(self, num_local_experts, config, *args, **kwargs):
        unset = copy.copy(config)
        unset.init_method = unset.output_layer_init_method = _no_init
        with torch.random.fork_rng(devices=_rng_devices()):
            super().__init__(num_local_experts, unset, *args, **kwargs)
        self.config = config
        self._finish_build()
        if config.perform_initialization:
            reset_expert_parameters(self, _LAYER.get(), torch.initial_seed())

    def _finish_build(self) -> None:
        """Hook for the subclass: rearrange the built weights before they are initialised."""


def _stream_seed(seed: int, layer: int, expert: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{layer}:{expert}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draw(init_method, shape: tuple, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.empty(shape, dtype=torch.float32)
        init_method(out)
    return out


@torch.no_grad()
def reset_expert_parameters(module: torch.nn.Module, layer_number: int, seed: int) -> None:
    """Initialise the local experts of ``module`` (any ``model.expert_impl``) so that global expert
    g of layer l is the same tensor at every EP x ETP layout and distinct from every other: its
    whole (expert-tensor-unsharded) fc1 ``[2F, H]`` and fc2 ``[H, F]`` are drawn with the config's
    ``init_method`` / ``output_layer_init_method`` from a stream seeded by (seed, l, g), and this
    rank keeps its expert-tensor-parallel slice (fc1: rows of gate and of up; fc2: columns)."""
    from megatron.core import parallel_state as ps

    fc1s, fc2s = local_expert_weights(module)
    cfg = module.config
    first = ps.get_expert_model_parallel_rank() * len(fc1s)
    rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    for i, (w1, w2) in enumerate(zip(fc1s, fc2s)):
        expert = first + i
        rows, cols = w1.shape[0] // 2, w2.shape[1]          # this rank's F (fc1 halves, fc2 cols)
        full1 = _draw(cfg.init_method, (2 * rows * size, w1.shape[1]),
                      _stream_seed(seed, layer_number, expert, "fc1"))
        gate, up = full1.chunk(2)
        part = slice(rank * rows, (rank + 1) * rows)
        w1.copy_(torch.cat([gate[part], up[part]]))
        full2 = _draw(cfg.output_layer_init_method, (w2.shape[0], cols * size),
                      _stream_seed(seed, layer_number, expert, "fc2"))
        w2.copy_(full2[:, rank * cols: (rank + 1) * cols])


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


def grouped_rows(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts,
                 transpose: bool) -> torch.Tensor:
    """Rows of ``a [T, K]`` of group e times ``w[e]`` (``w[e].T`` if ``transpose``) -> ``[T, N]``
    for ``w [E, N, K]`` (``[E, K, N]`` without ``transpose``); ``counts()`` gives the rows per group
    as a list, asked only where the grouped kernel cannot run."""
    out = _kernel(a, w.transpose(1, 2) if transpose else w, offs)
    if out is not None:
        return out
    parts = [x @ (we.t() if transpose else we) for x, we in zip(torch.split(a, counts()), w)]
    n = w.shape[1 if transpose else 2]
    return torch.cat(parts) if parts else a.new_empty(0, n)


def grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor,
                        counts) -> torch.Tensor:
    """``[E, N, K]``: per group e, ``dy_e.T @ x_e`` for ``dy [T, N]``, ``x [T, K]``."""
    out = _kernel(dy.t(), x, offs)
    if out is not None:
        return out
    rows = counts()
    return torch.stack([d.t() @ xe for d, xe in zip(torch.split(dy, rows), torch.split(x, rows))])


def group_offsets(tokens_per_expert, device: torch.device) -> torch.Tensor:
    """int32 end offsets of each expert's rows on ``device``, for the grouped kernel. A host count
    tensor goes to a GPU from pinned memory without blocking (a pageable copy would wait for the
    stream); a device count tensor stays where it is (no host round trip)."""
    counts = (tokens_per_expert if torch.is_tensor(tokens_per_expert)
              else torch.tensor(tokens_per_expert, dtype=torch.int64))
    if counts.device != device:
        if device.type == "cuda":
            counts = counts.pin_memory().to(device, non_blocking=True)
        else:
            counts = counts.to(device)
    return counts.cumsum(0).to(torch.int32)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


class _GroupedSwiGLU(torch.autograd.Function):
    """``y = fc2_e((silu(g) * u) * p)`` with ``[g; u] = fc1_e(x)`` for the rows of expert ``e``;
    ``w1 [E, 2F, H]``, ``w2 [E, H, F]``."""

    @staticmethod
    def forward(ctx, x, probs, offs, counts, recompute_act, w1, w2):
        h = grouped_rows(x, w1, offs, counts, transpose=True)                          # [T, 2F]
        act = _swiglu(h)
        inter = (act * probs.unsqueeze(-1)).to(act.dtype)
        y = grouped_rows(inter, w2, offs, counts, transpose=True)                      # [T, H]
        ctx.counts, ctx.recompute_act = counts, recompute_act
        ctx.save_for_backward(x, probs, h, offs, w1, w2, *([] if recompute_act else [act]))
        return y

    @staticmethod
    def backward(ctx, dy):
        counts = ctx.counts
        x, probs, h, offs, w1, w2, *rest = ctx.saved_tensors
        act = _swiglu(h) if ctx.recompute_act else rest[0]
        dy = dy.contiguous()
        inter = (act * probs.unsqueeze(-1)).to(act.dtype)
        d_inter = grouped_rows(dy, w2, offs, counts, transpose=False)                  # [T, F]
        dw2 = grouped_weight_grad(dy, inter, offs, counts)                             # [E, H, F]
        d_scaled = d_inter.to(torch.promote_types(act.dtype, probs.dtype))
        d_probs = (d_scaled * act).sum(-1).to(probs.dtype)
        d_act = (d_scaled * probs.unsqueeze(-1)).to(act.dtype)
        gate, up = torch.chunk(h, 2, dim=-1)
        sig = torch.sigmoid(gate)
        d_gate = d_act * up * (sig * (1 + gate * (1 - sig)))
        d_up = d_act * (gate * sig)
        dh = torch.cat([d_gate, d_up], dim=-1)                                         # [T, 2F]
        dx = grouped_rows(dh, w1, offs, counts, transpose=False)                       # [T, H]
        dw1 = grouped_weight_grad(dh, x, offs, counts)                                 # [E, 2F, H]
        return dx, d_probs, None, None, None, dw1, dw2


class _RowCounts:
    """Rows per expert as a Python list, converted once and only if a fallback asks for it (on a
    GPU the grouped kernel needs only the device offsets: no host synchronisation)."""

    def __init__(self, tokens_per_expert):
        self.source, self.rows = tokens_per_expert, None

    def __call__(self) -> list:
        if self.rows is None:
            src = self.source
            self.rows = [int(c) for c in (src.tolist() if torch.is_tensor(src) else src)]
        return self.rows


class SequentialExperts(DistinctInitExperts, SequentialMLP):
    """megatron-core's SequentialMLP, initialised per global expert (:class:`DistinctInitExperts`)."""


_STACKED = {"linear_fc1": "weight1", "linear_fc2": "weight2"}


class GroupedSwiGLUExperts(DistinctInitExperts, SequentialMLP):
    """All local SwiGLU experts as grouped GEMMs, with SequentialMLP's checkpoint layout.

    The weights are two stacked parameters, ``weight1 [E, 2F, H]`` (per expert [gate; up]) and
    ``weight2 [E, H, F]``, owned by this module: megatron's overlapped parameter all-gather waits
    for them in this module's forward pre-hook, the grouped kernel reads them in place (no copy per
    step, whatever buffer the distributed optimizer placed them in) and their gradients come out
    stacked. ``local_experts`` keeps SequentialMLP's per-expert modules without weights: the plain
    state dict shows ``local_experts.{i}.linear_fc{1,2}.weight`` (views of the stacked weights) and
    loads from them, and :meth:`sharded_state_dict` writes exactly SequentialMLP's distributed
    layout, so checkpoints, HF conversion and ``parallel_slicing`` are the same for every
    ``model.expert_impl``. Expert linears are purely local under expert parallelism (the token
    dispatcher does the expert-tensor-parallel gather/reduce-scatter), so this is exact at any
    EP x ETP.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
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
        super().__init__(num_local_experts, config, submodules, pg_collection)
        self.recompute_act = recompute_moe_act(config)

    def _finish_build(self) -> None:
        for linear, stacked in _STACKED.items():
            params = [getattr(e, linear)._parameters.pop("weight") for e in self.local_experts]
            weight = torch.nn.Parameter(torch.stack([p.data for p in params]))
            for attr, value in vars(params[0]).items():   # megatron's TP/EP attributes
                setattr(weight, attr, value)
            if hasattr(weight, "partition_dim"):
                weight.partition_dim += 1                  # behind the expert axis
            setattr(self, stacked, weight)
        self._register_state_dict_hook(_stacked_to_expert_keys)
        self._register_load_state_dict_pre_hook(_expert_keys_to_stacked, with_module=True)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        offs = group_offsets(tokens_per_expert, x.device)
        out = _GroupedSwiGLU.apply(x.reshape(-1, x.shape[-1]), permuted_probs.reshape(-1), offs,
                                   _RowCounts(tokens_per_expert), self.recompute_act,
                                   self.weight1, self.weight2)
        return out.view(*x.shape[:-1], out.shape[-1]), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's layout (per global expert, gate/up split), one factory per stacked weight
        so that the distributed optimizer finds each parameter's sharding (it maps by tensor)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        views = {}
        for linear, stacked in _STACKED.items():
            for i, expert in enumerate(self.local_experts):
                view = torch.nn.Parameter(getattr(self, stacked)[i].detach(), requires_grad=False)
                getattr(expert, linear)._parameters["weight"] = view
        try:
            state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            for linear in _STACKED:
                for expert in self.local_experts:
                    getattr(expert, linear)._parameters.pop("weight")
        for linear, stacked in _STACKED.items():
            parts = [state.pop(f"{prefix}local_experts.{i}.{linear}.weight")
                     for i in range(self.num_local_experts)]
            views[stacked] = ShardedTensorFactory(
                parts[0].key, getattr(self, stacked), partial(_build_per_expert, parts),
                partial(_merge_per_expert, parts), replica_id=parts[0].replica_id)
        state.update({f"{prefix}{name}": factory for name, factory in views.items()})
        return state


def _build_per_expert(parts: list, key: str, stacked: torch.Tensor, replica_id, flattened_range):
    """The per-expert sharded tensors of SequentialMLP's layout over ``stacked`` (weights or an
    optimizer state of the same shape): ``parts[i]`` is expert i's ShardedTensor or factory."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if flattened_range is not None:
        raise NotImplementedError("grouped experts: flattened optimizer formats are not supported; "
                                  "use fully_reshardable or dp_reshardable")
    out = []
    for part, tensor in zip(parts, stacked.unbind(0)):
        if isinstance(part, ShardedTensorFactory):
            out.append(part.build_fn(key, tensor, replica_id, None))
        else:
            out.append(replace(part, key=key, data=tensor, dtype=tensor.dtype, replica_id=replica_id))
    return out


def _merge_per_expert(parts: list, loaded: list) -> torch.Tensor:
    """The stacked tensor from the per-expert pieces :func:`_build_per_expert` asked for."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return torch.stack([part.merge_fn(piece) if isinstance(part, ShardedTensorFactory) else piece
                        for part, piece in zip(parts, loaded)])


def _stacked_to_expert_keys(module, state_dict, prefix, local_metadata):
    """Plain state dict: ``weight1``/``weight2`` shown as SequentialMLP's per-expert keys."""
    for linear, stacked in _STACKED.items():
        weight = state_dict.pop(prefix + stacked)
        for i, view in enumerate(weight.unbind(0)):
            state_dict[f"{prefix}local_experts.{i}.{linear}.weight"] = view
    return state_dict


def _expert_keys_to_stacked(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                            errors):
    """Load SequentialMLP's per-expert keys into the stacked weights (all of them or none)."""
    for linear, stacked in _STACKED.items():
        keys = [f"{prefix}local_experts.{i}.{linear}.weight" for i in range(module.num_local_experts)]
        if prefix + stacked not in state_dict and all(k in state_dict for k in keys):
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(k) for k in keys])


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

    class TEGroupedSwiGLUExperts(DistinctInitExperts, TEGroupedMLP):
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
    spec.module = GroupedSwiGLUExperts if impl == "grouped" else SequentialExperts
    return spec


def local_expert_weights(module: torch.nn.Module) -> Optional[tuple[list, list]]:
    """(fc1 weights, fc2 weights) of the local experts, one tensor per expert in local order
    (``[2F, H]`` = [gate; up] and ``[H, F]``, this rank's expert-tensor shard; views of the
    stacked weights for ``grouped``), for an experts module of any ``model.expert_impl``; None for
    other modules."""
    impl = expert_impl_of(module)
    if impl is None:
        return None
    if impl == "grouped":
        return list(module.weight1.unbind(0)), list(module.weight2.unbind(0))
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
    if isinstance(module, SequentialMLP):
        return "sequential"
    return "te" if type(module).__name__ == "TEGroupedSwiGLUExperts" else None
