"""Every parameter is read inside the forward of the module that owns it.

Megatron's overlapped parameter all-gather (``parallel.overlap_param_gather``, on in the cluster
recipes) waits for a parameter's bucket in the forward pre-hook of the module that registered the
parameter. A parameter read anywhere else (a helper method called by a parent, a parent reading a
child's weight) is read while its all-gather may still be in flight: replicas diverge silently and
megatron later asserts ``param_gather_handle is None``. This test runs the LongCat model's forward
(N-gram embedding, grouped experts, MTP, bf16 as shipped) under a torch-function mode that records
every op touching a parameter whose owner is not among the modules currently in their forward;
``tests/test_recipe_rehearsal.py`` checks the consequence (replicas bitwise equal every step) on 4
ranks with the recipes' settings.
"""

from tests.harness import run_distributed
from tests.train_utils import ROOT


def _reads_outside_owner(expert_impl: str) -> list:
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.training.setup import build_model

    cfg = load_config(f"{ROOT}/configs/tiny_longcat_ngram.yaml", [
        "parallel.tensor=1", "parallel.sequence_parallel=false", "optimizer.bf16=true",
        f"model.expert_impl={expert_impl}", "model.ngram.partition=tensor_data"])
    layout = runtime.initialize(num_experts=cfg.model.num_experts, seed=1)
    model = build_model(cfg, layout, wrap_ddp=False)[0]
    owner = {id(p): m for m in model.modules() for p in m._parameters.values() if p is not None}
    names = {id(p): n for n, p in model.named_parameters()}
    active: list = []
    bad: dict = {}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.nn.Parameter) and id(t) in owner and not any(
                        m is owner[id(t)] for m in active):
                    bad.setdefault(names[id(t)], getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    pre = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: active.append(m))
    post = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: active.pop() and None)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32)[None].expand(2, -1)
    try:
        with Mode():
            loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:])
    finally:
        pre.remove()
        post.remove()
    loss.float().sum().backward()
    return sorted(bad.items())


def _both_impls() -> dict:
    return {impl: _reads_outside_owner(impl) for impl in ("grouped", "sequential")}


def test_every_parameter_is_read_in_its_modules_forward():
    assert run_distributed(_both_impls, 1)[0] == {"grouped": [], "sequential": []}
