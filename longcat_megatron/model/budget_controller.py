"""Computational-budget controller for the FFN-expert selection bias (LongCat-Flash §3.3).

Each step, from the global token counts of the step, the error of FFN expert i is

    e_i = K_e / (K * N) - T_i / (K * T_all)

(K_e: target mean FFN experts per token, K: top-k, N: FFN experts, T_i: picks of expert i, T_all:
tokens). The bias moves by the velocity-form PID step

    db_i = mu_t * (k_i * e_i + k_p * (e_i - e'_i) + k_d * (e_i - 2 e'_i + e''_i)),   mu_t = mu * decay^t

with e', e'' the previous two errors. ``k_i = 1, k_p = k_d = 0`` is the paper's rule. Zero experts'
bias never changes. All state lives in buffers, so it is saved with the model's checkpoint.
"""

from __future__ import annotations

import torch

from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.full_precision import KeepsFullPrecision


class BudgetController(KeepsFullPrecision, torch.nn.Module):
    """Holds the controller state of one router; :meth:`step` returns the FFN-bias increment.
    Its state stays float64 under bf16 (:mod:`longcat_megatron.model.full_precision`)."""

    full_precision_names = ("prev_error", "prev_prev_error")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.num_experts
        self.target = float(cfg.budget_target_ffn_experts or 0.0)
        self.topk = cfg.moe_router_topk
        self.num_ffn = n
        self.rate, self.decay = cfg.budget_rate, cfg.budget_rate_decay
        self.kp, self.ki, self.kd = cfg.budget_kp, cfg.budget_ki, cfg.budget_kd
        self.register_buffer("prev_error", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("prev_prev_error", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def error(self, ffn_counts: torch.Tensor, tokens: float) -> torch.Tensor:
        """``e_i`` from the global picks per FFN expert and the global token count."""
        k, n = self.topk, self.num_ffn
        return self.target / (k * n) - ffn_counts.double() / (k * max(tokens, 1.0))

    @torch.no_grad()
    def step(self, ffn_counts: torch.Tensor, tokens: float) -> torch.Tensor:
        """Advance one optimizer step; returns ``db`` for the N FFN experts (float64)."""
        e = self.error(ffn_counts, tokens)
        rate = self.rate * self.decay ** int(self.steps)
        delta = rate * (self.ki * e + self.kp * (e - self.prev_error)
                        + self.kd * (e - 2 * self.prev_error + self.prev_prev_error))
        self.prev_prev_error.copy_(self.prev_error)
        self.prev_error.copy_(e)
        self.steps += 1
        return delta
