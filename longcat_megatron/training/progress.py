"""Human-readable progress lines and TensorBoard scalars (written by one rank only)."""

from __future__ import annotations

import sys
import time
from typing import Optional


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressLogger:
    """Prints ``iter 10/100 | loss ... | lr ... | grad-norm ... | tok/s ... | eta ...`` and logs the
    same scalars to TensorBoard. Only the rank that owns it (``enabled``) writes anything."""

    def __init__(self, enabled: bool, total_iters: int, tokens_per_iter: int,
                 tensorboard_dir: Optional[str] = None, interval: int = 1, stream=None):
        self.enabled = enabled
        self.total = total_iters
        self.tokens_per_iter = tokens_per_iter
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

    def start(self, iteration: int) -> None:
        self._t_last = time.monotonic()
        self._it_last = iteration

    def step(self, iteration: int, scalars: dict, extra: Optional[dict] = None) -> None:
        """Record one finished iteration; print every ``interval`` iterations."""
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
        self._t_last, self._it_last = now, iteration
        parts = [f"iter {iteration:>6d}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "lr" in scalars:
            parts.append(f"lr {scalars['lr']:.3e}")
        if "grad_norm" in scalars:
            parts.append(f"grad-norm {scalars['grad_norm']:.3f}")
        parts.append(f"{self.tokens_per_iter / max(dt, 1e-9):,.0f} tok/s")
        parts.append(f"{dt:.3f} s/it")
        parts.append(f"eta {_fmt_duration(dt * (self.total - iteration))}")
        for k, v in (extra or {}).items():
            if k.startswith("progress/"):
                parts.append(f"{k[len('progress/'):]} {v:.3g}")
        self.print(" | ".join(parts))

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
