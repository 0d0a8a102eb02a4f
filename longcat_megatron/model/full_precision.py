"""Module state that dtype casts must not touch (the router's and the budget controller's).

With ``optimizer.bf16`` megatron's ``Float16Module`` calls ``module.bfloat16()``, which casts every
floating-point parameter and buffer. For routing state that is wrong: bf16 has 8 significant bits, so
accumulated pick counts stop being integers (300 x 37 = 11100 is stored as 11648), and once an expert
bias reaches ~0.05 a controller update of 5.6e-5 rounds to 0. :class:`KeepsFullPrecision` lets a
module name the tensors that keep their own dtype through any ``_apply`` (``.bfloat16()``,
``.half()``, ``.to(dtype)``); device moves (``.cuda()``, ``.to(device)``) still apply to them.
Megatron-core makes the same exception for its own router (``_maintain_float32_expert_bias``), but
re-casts after the fact, which cannot undo the rounding.
"""

from __future__ import annotations

import torch


class KeepsFullPrecision:
    """Mixin for ``torch.nn.Module``: the parameters/buffers named in ``full_precision_names`` keep
    their dtype when the module is cast; they still follow device moves."""

    full_precision_names: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        kept = {}
        orders = [list(self._parameters), list(self._buffers)]
        for name in self.full_precision_names:
            for table in (self._parameters, self._buffers):
                if table.get(name) is not None:
                    kept[name] = (table, table.pop(name))
        try:
            result = super()._apply(fn, *args, **kwargs)
        finally:
            for table, order in zip((self._parameters, self._buffers), orders):
                current = dict(table)
                current.update({n: t for n, (tb, t) in kept.items() if tb is table})
                table.clear()
                table.update((n, current[n]) for n in order)   # registration order kept
        for name, (table, tensor) in kept.items():
            # Where ``fn`` sends a tensor (its device), learnt from an empty probe of the same dtype.
            target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
            if tensor.device != target:
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.to(target)   # keeps the Parameter and its attributes
                else:
                    table[name] = tensor.to(target)
        return result


def full_precision_state(model: torch.nn.Module) -> dict:
    """``{qualified name: tensor}`` of every tensor a module of ``model`` declares full precision
    (its ``full_precision_names``): what a bf16 model must still hold in fp32/fp64."""
    out = {}
    for module_name, module in model.named_modules():
        for name in getattr(module, "full_precision_names", ()):
            tensor = module._parameters.get(name)
            if tensor is None:
                tensor = module._buffers.get(name, getattr(module, name, None))
            if torch.is_tensor(tensor):
                out[f"{module_name}.{name}".lstrip(".")] = tensor
    return out
