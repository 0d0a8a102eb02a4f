"""Human-readable progress lines and TensorBoard scalars (written by one rank only).

The line: iteration, loss, LR, grad norm, tokens so far, tokens/s, TFLOP/s per GPU (from the
model's FLOP count, :mod:`longcat_megatron.model.flops`), MFU (when the GPU's peak is known or
``logging.peak_tflops`` is set), peak memory of this rank, s/it, ETA, then the model's own
``progress/*`` figures.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def peak_memory_gb() -> tuple[float, str]:
    """(peak bytes / 1e9, what was measured): CUDA peak allocated, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9, "GPU"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "RSS"


def device_peak_tflops() -> Optional[float]:
    """Dense BF16 peak of this rank's GPU by name (None on CPU or an unknown GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from longcat_megatron.model.flops import peak_tflops_of

    return peak_tflops_of(torch.cuda.get_device_name())


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressLogger:
    """Prints ``iter 10/100 | loss ... | lr ... | grad-norm ... | tok/s ... | eta ...`` and logs the
    same scalars to TensorBoard. Only the rank that owns it (``enabled``) writes anything."""

    def __init__(self, enabled: bool, total_iters: int, tokens_per_iter: int,
                 tensorboard_dir: Optional[str] = None, interval: int = 1, stream=None,
                 flops_per_token: Optional[Callable[[Optional[float]], float]] = None,
                 world_size: int = 1, peak_tflops: Optional[float] = None):
        """``flops_per_token(experts_per_token or None)``: training FLOPs per token (enables the
        TFLOP/s figure); ``peak_tflops``: per-GPU peak for MFU (None: not shown)."""
        self.enabled = enabled
        self.total = total_iters
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token = flops_per_token
        self.world_size = max(1, world_size)
        self.peak_tflops = peak_tflops
        self._tokens_last: Optional[int] = None
        self.interval = max(1, interval)
        self.stream = stream or sys.stdout
        self.writer = None
        self._t_last = time.monotonic()
        self._it_last: Optional[int] = None
        self.history: list[tuple[int, float]] = []
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start(self, iteration: int, tokens: Optional[int] = None) -> None:
        self._t_last = time.monotonic()
        self._it_last = iteration
        self._tokens_last = tokens

    def step(self, iteration: int, scalars: dict, extra: Optional[dict] = None,
             tokens: Optional[int] = None) -> None:
        """Record one finished iteration (``tokens``: trained so far, all stages of this run's
        data position); print every ``interval`` iterations."""
        if not self.enabled:
            return
        if "loss" in scalars:
            self.history.append((iteration, scalars["loss"]))
        if self.writer is not None:
            for k, v in {**scalars, **(extra or {})}.items():
                self.writer.add_scalar(k, v, iteration)
        if iteration % self.interval and iteration != self.total:
            return
        now = time.monotonic()
        its = iteration - (self._it_last if self._it_last is not None else iteration - 1)
        dt = (now - self._t_last) / max(its, 1)
        if tokens is not None and self._tokens_last is not None and its > 0:
            step_tokens = (tokens - self._tokens_last) / its
        else:
            step_tokens = self.tokens_per_iter
        self._t_last, self._it_last, self._tokens_last = now, iteration, tokens
        parts = [f"iter {iteration:>6d}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "lr" in scalars:
            parts.append(f"lr {scalars['lr']:.3e}")
        if "grad_norm" in scalars:
            parts.append(f"grad-norm {scalars['grad_norm']:.3f}")
        if tokens is not None:
            parts.append(f"tokens {_fmt_count(tokens)}")
        tok_s = step_tokens / max(dt, 1e-9)
        parts.append(f"{tok_s:,.0f} tok/s")
        figures = self.figures(tok_s, (extra or {}).get("progress/experts/tok"))
        if "tflops_per_gpu" in figures:
            per = "GPU" if figures["mem_kind"] == "GPU" else "rank"
            tf = figures["tflops_per_gpu"]
            parts.append(f"{tf:.1f} TFLOP/s/{per}" if tf >= 1 else f"{tf * 1e3:.2f} GFLOP/s/{per}")
        if "mfu" in figures:
            parts.append(f"MFU {figures['mfu']:.1%}")
        parts.append(f"mem {figures['peak_mem_gb']:.2f} GB {figures['mem_kind']}")
        parts.append(f"{dt:.3f} s/it")
        if self.writer is not None:
            for k, v in figures.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"throughput/{k}", v, iteration)
            self.writer.add_scalar("throughput/tokens_per_s", tok_s, iteration)
            if tokens is not None:
                self.writer.add_scalar("tokens", tokens, iteration)
        parts.append(f"eta {_fmt_duration(dt * (self.total - iteration))}")
        for k, v in (extra or {}).items():
            if k.startswith("progress/"):
                parts.append(f"{k[len('progress/'):]} {v:.3g}")
        self.print(" | ".join(parts))

    def figures(self, tokens_per_s: float, experts_per_token: Optional[float] = None) -> dict:
        """TFLOP/s per GPU (all ranks' tokens / world size), MFU and peak memory of this rank."""
        out: dict = {}
        if self.flops_per_token is not None:
            tflops = self.flops_per_token(experts_per_token) * tokens_per_s / self.world_size / 1e12
            out["tflops_per_gpu"] = tflops
            if self.peak_tflops:
                out["mfu"] = tflops / self.peak_tflops
        out["peak_mem_gb"], out["mem_kind"] = peak_memory_gb()
        return out

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
