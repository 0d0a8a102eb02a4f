"""Resume with TransformerEngine's / apex's FusedAdam (NGC images, ``pip install .[gpu]``).

megatron-core takes FusedAdam from TE or apex when either is importable; FusedAdam keeps ``step`` in
the param group, not in each parameter's state (which holds only ``exp_avg`` / ``exp_avg_sq``). CPU
machines cannot install TE or apex, so each test process simulates them the way megatron sees them:
a small FusedAdam with the same math and state layout is megatron's ``Adam`` (in
``megatron.core.optimizer``, where ``get_megatron_optimizer`` takes it, and in
``distrib_optimizer``), ``HAVE_APEX_OR_TE`` / ``USING_TE_OPTIMIZER`` are set, and
``mcore_fixes.apply()`` makes its decisions as it would with TE installed.

A bf16 tiny model with the distributed optimizer at DP=2 trains 8 steps straight, and 4 + resume + 4;
losses and weights must be equal bitwise. Before the fix the resume died in megatron's
``_set_main_param_and_optimizer_states`` with ``KeyError: 'step'`` (the load template had a torch-Adam
``step`` in each state, which the checkpoint does not hold).
"""

from __future__ import annotations

import math

import torch

from tests.harness import run_distributed
from tests.train_utils import run_training

BASE = ["train.train_iters=8", "schedule.warmup_iters=2", "parallel.distributed_optimizer=true",
        "optimizer.bf16=true"]


class FakeFusedAdam(torch.optim.Optimizer):
    """TE/apex FusedAdam as megatron sees it: ``step`` in the param group, state = exp_avg and
    exp_avg_sq only (created at the first step), AdamW or L2 decay by ``adam_w_mode``."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, **_):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    steps_taken = 0  # over all instances of this process: the runs really used this optimizer

    @torch.no_grad()
    def step(self, closure=None):
        FakeFusedAdam.steps_taken += 1
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            c1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                assert set(state) == {"exp_avg", "exp_avg_sq"}, sorted(state)
                grad = p.grad
                if not self.adam_w_mode and group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / c2).sqrt_().add_(group["eps"])
                update = (state["exp_avg"] / c1) / denom
                if self.adam_w_mode and group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


def simulate_fused_adam() -> None:
    """Make this process's megatron-core build FusedAdam optimizers, as with TE installed; then let
    ``mcore_fixes.apply()`` decide as with TE (the CPU model still needs the local-spec fixes)."""
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import distrib_optimizer as dopt

    from longcat_megatron import cpu_compat, mcore_fixes

    mopt.Adam, mopt.USING_PYTORCH_OPTIMIZER = FakeFusedAdam, False
    dopt.Adam, dopt.HAVE_APEX_OR_TE, dopt.USING_TE_OPTIMIZER = FakeFusedAdam, True, True
    cpu_compat.apply()
    real = mcore_fixes.have_transformer_engine
    mcore_fixes.have_transformer_engine = lambda: True
    try:
        mcore_fixes.apply()
    finally:
        mcore_fixes.have_transformer_engine = real
    restore = getattr(mcore_fixes, "fix_optimizer_state_restore", None)
    for fix in mcore_fixes.FIXES:  # the local layer spec's fixes, which TE users do not need
        if fix is not restore:
            fix()


def _job(root: str) -> dict:
    simulate_fused_adam()
    straight = run_training(BASE + [f"checkpoint.save={root}/straight"])
    first = run_training(BASE + [f"checkpoint.save={root}/split", "train.exit_interval=4"])
    second = run_training(BASE + [f"checkpoint.save={root}/split"])
    return {"straight": straight, "first": first, "second": second,
            "fused_steps": FakeFusedAdam.steps_taken}


def test_fused_adam_resume_is_bitwise_exact(tmp_path):
    out = run_distributed(_job, 2, str(tmp_path), timeout=420)
    for rank in range(2):
        r = out[rank]
        assert r["fused_steps"] == 8 + 4 + 4  # every optimizer step was FusedAdam's
        assert r["first"]["iteration"] == 4 and r["second"]["resumed_from"] == 4
        losses = {**r["first"]["losses"], **r["second"]["losses"]}
        if rank == 0:
            assert losses == r["straight"]["losses"]
            assert all(math.isfinite(v) for v in losses.values())
            assert losses[8] < losses[1]
        a, b = r["straight"]["weights"], r["second"]["weights"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
