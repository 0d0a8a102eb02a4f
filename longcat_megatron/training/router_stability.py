"""Router stability metrics per MoE layer (reference §3.3): the gradient-balance ratio
``R_g = ||alpha grad_W L_LB||_2 / ||grad_W L_LM||_2`` of each router weight ``W`` (kept below 0.1 by
the LongCat team) and the mean pairwise cosine similarity of the router's expert vectors (rows of
``W``; routers whose rows grow alike stop telling experts apart).

Measured only on logging steps (``logging.router_stability``, every ``logging.log_interval``
iterations); other steps register nothing and run nothing. On a measured step, per router:

* a forward hook takes ``d(aux loss)/dW`` with ``autograd.grad(..., retain_graph=True)`` (the aux
  loss already holds alpha; only the path through this router's scores, not through later layers'
  inputs), and, on the step's first forward, the cosine figure (the weight is read inside the
  router's forward, where megatron's overlapped parameter all-gather has delivered it);
* a tensor hook on ``W`` adds up its full gradient of each backward (LM + MTP + z-loss + LB).

Both are local, before megatron's DDP reduction (with the distributed optimizer ``main_grad`` holds
only a shard afterwards). One all-reduce over the ranks that share the router weight's gradient
(data x context parallel, times tensor parallel under sequence parallelism: the group of
``ZeroExpertRouter.end_step``) sums them; the LB part is scaled like megatron scales the aux loss's
backward (``MoEAuxLossAutoScaler.main_loss_backward_scale``), and the LM part is total minus LB.
Under pipeline parallelism one MAX all-reduce over the pipeline group gives rank 0 every layer.
Both go through :mod:`longcat_megatron.collectives`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from longcat_megatron import collectives


def mean_pairwise_cosine(weight: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``weight [E, H]`` (O(E H):
    the sum of the Gram matrix of unit rows is ``||sum_i w_i/|w_i| ||^2``)."""
    unit = torch.nn.functional.normalize(weight.detach().float(), dim=-1)
    e = unit.shape[0]
    if e < 2:
        return float("nan")
    total = unit.sum(0).pow(2).sum()
    return float((total - e) / (e * (e - 1)))


class _RouterProbe:
    """The hooks on one router for one measured step."""

    def __init__(self, router):
        self.router = router
        self.total = torch.zeros_like(router.weight, dtype=torch.float32)
        self.lb = torch.zeros_like(router.weight, dtype=torch.float32)
        self.cosine: Optional[float] = None
        self._capturing = False
        self._handles = [router.register_forward_hook(self._after_forward),
                         router.weight.register_hook(self._on_grad)]

    def _after_forward(self, module, args, routing) -> None:
        if self.cosine is None:
            self.cosine = mean_pairwise_cosine(module.weight)
        aux = getattr(routing, "aux_loss", None)
        # Full recompute: the first forward runs without a graph, its recomputation builds one.
        if aux is None or not torch.is_grad_enabled() or not aux.requires_grad:
            return
        self._capturing = True
        try:
            (grad,) = torch.autograd.grad(aux, module.weight, retain_graph=True, allow_unused=True)
        finally:
            self._capturing = False
        if grad is not None:
            self.lb += grad.float()

    def _on_grad(self, grad: torch.Tensor):
        if not self._capturing:
            self.total += grad.detach().float()
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _grad_group(config):
    """The ranks whose router-weight gradients megatron sums (as ``ZeroExpertRouter.end_step``)."""
    from megatron.core import parallel_state as ps

    from longcat_megatron.model.parallel_info import sequence_parallel_size

    if sequence_parallel_size(config) > 1:
        return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return ps.get_data_parallel_group(with_context_parallel=True)


def _aux_backward_scale() -> float:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    return 1.0 if scale is None else float(scale.reshape(-1)[0])


class RouterStability:
    """``arm(model_chunks, iteration)`` before the step's forward/backward, ``collect()`` after it
    (on every rank: it makes collectives) -> ``{moe/layerL/grad_balance, moe/layerL/expert_cosine,
    progress/Rg-max, progress/router-cos}``; warns through ``warn`` when a layer's R_g stayed above
    ``bound`` for ``patience`` measured steps in a row."""

    def __init__(self, enabled: bool, interval: int, bound: float, patience: int, num_layers: int,
                 warn: Callable[[str], None]):
        self.enabled = enabled
        self.interval = max(1, interval)
        self.bound = bound
        self.patience = max(1, patience)
        self.num_layers = num_layers
        self.warn = warn
        self._probes: list = []       # (layer index, probe) of the armed step
        self._iteration = 0
        self._above: dict = {}        # layer -> consecutive measured steps above the bound

    def arm(self, model_chunks: list, iteration: int) -> None:
        """Install the hooks if ``iteration`` is a measured step (else nothing)."""
        self._probes = []
        if not self.enabled or iteration % self.interval:
            return
        from longcat_megatron.training.setup import model_hook

        self._iteration = iteration
        for routers in model_hook(model_chunks, "routers"):
            self._probes += [(index, _RouterProbe(router)) for index, router in routers()]

    def collect(self) -> dict:
        """Reduce the armed step's gradients and return its metrics (empty on other steps)."""
        if not self._probes:
            return {}
        probes, self._probes = self._probes, []
        for _, p in probes:
            p.remove()
        flat = torch.cat([torch.cat([p.total.reshape(-1), p.lb.reshape(-1)]) for _, p in probes])
        import torch.distributed as dist

        if dist.is_initialized():
            collectives.all_reduce(flat, group=_grad_group(probes[0][1].router.config))
        scale = _aux_backward_scale()
        per_layer = torch.full((2, self.num_layers), -math.inf, dtype=torch.float64)
        offset = 0
        for index, p in probes:
            n = p.total.numel()
            total, lb = flat[offset:offset + n], flat[offset + n:offset + 2 * n] * scale
            offset += 2 * n
            lm = float(torch.linalg.vector_norm(total - lb))
            per_layer[0, index] = (float(torch.linalg.vector_norm(lb)) / lm if lm > 0
                                   else math.nan if math.isnan(lm) else math.inf)
            per_layer[1, index] = p.cosine if p.cosine is not None else -math.inf
        per_layer = self._gather_stages(per_layer)
        return self._metrics(per_layer)

    @staticmethod
    def _gather_stages(per_layer: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            collectives.all_reduce(per_layer, op=torch.distributed.ReduceOp.MAX,
                                   group=ps.get_pipeline_model_parallel_group())
        return per_layer

    def _metrics(self, per_layer: torch.Tensor) -> dict:
        out: dict = {}
        ratios, cosines = {}, {}
        for layer in range(per_layer.shape[1]):
            r, c = float(per_layer[0, layer]), float(per_layer[1, layer])
            if r != -math.inf:
                ratios[layer] = r
                out[f"moe/layer{layer}/grad_balance"] = r
            if c != -math.inf:
                cosines[layer] = c
                out[f"moe/layer{layer}/expert_cosine"] = c
        if ratios:
            out["progress/Rg-max"] = max(ratios.values())
        if cosines:
            out["progress/router-cos"] = max(cosines.values())
        for layer, r in ratios.items():
            if not r <= self.bound:          # NaN counts as above
                self._above[layer] = self._above.get(layer, 0) + 1
                if self._above[layer] == self.patience:
                    self.warn(f"[stability] warning: iteration {self._iteration}: layer {layer} router "
                              f"gradient balance R_g = {r:.3g} has been above logging.grad_balance_bound="
                              f"{self.bound:g} for {self.patience} measured step(s) in a row: the "
                              "load-balance loss dominates the router's gradient (lower "
                              "model.device_lb_loss_coeff, or watch for router collapse)")
            else:
                self._above[layer] = 0
        return out
