"""Non-finite and loss-spike steps: skip the update, log where, stop (exit 77) or roll back.

Per step, before the optimizer (:meth:`StabilityGuard.step`):

* a non-finite global loss, or a *spike* (loss above ``train.spike_factor`` x the median of the last
  ``train.spike_window`` accepted losses, once 5 are known), skips the update: the optimizer is not
  stepped, exactly as megatron skips an overflowed fp16 step;
* otherwise megatron's optimizer steps; with ``train.skip_non_finite`` its grad scaler is a
  ``ConstantGradScaler(1.0)`` (``training/setup.py``), so bf16 and the distributed optimizer
  check the main gradients for inf/NaN and skip the update themselves (``found_inf``, all-reduced by
  megatron). Megatron DDP's ``check_for_nan_in_grad`` would raise first, so it is off then.
  fp32 without the distributed optimizer (megatron's ``FP32Optimizer``) has no
  such check: a non-finite gradient norm there has already reached the weights and stops the run.

A skipped step still counts as an iteration and consumes its batch (as in Megatron-LM); the LR
schedule does not advance. Each one is logged with the iteration and the batch's data position
(samples ``[consumed, consumed + batch)`` of the global order). Once ``train.instability_limit``
steps within ``train.instability_window`` iterations were skipped, the run stops with
:data:`EXIT_UNSTABLE` (77; ``launch/common.sh`` does not requeue it) naming the last good checkpoint,
without saving. With ``train.spike_rollback`` it instead records a skip range in
``CHECKPOINT_DIR/stability.json`` (the unstable iterations and ``train.spike_skip_batches`` more) and
exits 75 (requeue): the next start resumes from the last committed checkpoint and, when it reaches
the range, consumes those batches without training on them (Megatron-LM's
``--skip-train-iteration-range``; PaLM's recovery). At most ``train.spike_rollback_max`` rollbacks
per run directory; then 77.

Every decision comes from values that are identical on all ranks (the all-reduced loss, megatron's
all-reduced ``found_inf`` / grad norm), so the ranks agree without a collective of their own.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Callable, Optional

# Exit code: "stopped for instability (non-finite / spike limit): an operator must act" (not requeued).
EXIT_UNSTABLE = 77
RECORD_FILE = "stability.json"  # in checkpoint.save: rollback skip ranges and instability stops
_MIN_HISTORY = 5


def describe(cfg) -> str:
    """The stability settings, for ``--dry-run``."""
    t, lg = cfg.train, cfg.logging
    spike = (f"loss > {t.spike_factor:g} x median of the last {t.spike_window} accepted losses"
             if t.spike_factor else "off")
    limit = (f"{t.instability_limit} skipped step(s) within {t.instability_window} iterations -> "
             + (f"roll back (skip the unstable batches + {t.spike_skip_batches} more; at most "
                f"{t.spike_rollback_max} rollbacks, then exit 77)" if t.spike_rollback
                else f"stop, exit {EXIT_UNSTABLE}") if t.instability_limit else "never stop")
    router = (f"every {lg.log_interval} iteration(s); warn when R_g > {lg.grad_balance_bound:g} for "
              f"{lg.grad_balance_patience} measured step(s)" if lg.router_stability else "off")
    return "\n".join([
        "  stability:",
        f"    skip non-finite loss/gradient steps: {'on' if t.skip_non_finite else 'off (megatron DDP raises on NaN)'}",
        f"    loss spike: {spike}",
        f"    instability limit: {limit}",
        f"    router stability (R_g, expert cosine): {router}",
    ])


def read_records(save_dir: Optional[str]) -> dict:
    """``{"rollbacks": [...], "stops": [...]}`` of ``save_dir`` (empty lists when none)."""
    out: dict = {"rollbacks": [], "stops": []}
    if not save_dir:
        return out
    try:
        with open(os.path.join(save_dir, RECORD_FILE)) as f:
            out.update(json.load(f))
    except (OSError, ValueError):
        pass
    return out


def _write_records(save_dir: str, records: dict) -> None:
    path = os.path.join(save_dir, RECORD_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


def last_good_checkpoint(save_dir: Optional[str], before: int) -> Optional[int]:
    """The newest committed checkpoint iteration below ``before`` (None when none is left)."""
    if not save_dir:
        return None
    from longcat_megatron.training.checkpointing import list_iterations, read_tracker

    committed = read_tracker(save_dir)
    if committed is None:
        return None
    if committed < before:
        return committed
    older = [i for i in list_iterations(save_dir) if i < before]
    return older[-1] if older else None


class StabilityGuard:
    """One run's guard. ``state`` is the loop's TrainState (its ``extra["stability"]`` carries the
    window across restarts); ``say`` prints on rank 0; ``rank`` for the per-rank log line."""

    def __init__(self, cfg, save_dir: Optional[str], state, say: Callable[[str], None], rank: int):
        from longcat_megatron.training.faults import note_progress

        self.t = cfg.train
        self.save_dir = save_dir
        self.state = state
        self.say = say
        self.rank = rank
        self.records = read_records(save_dir)
        saved = state.extra.get("stability") or {}
        self.unstable: list = [int(i) for i in saved.get("unstable", [])]   # skipped iterations
        self.history: list = [float(x) for x in saved.get("losses", [])]    # accepted losses
        self.stopped = False
        self._fatal: Optional[str] = None
        note_progress(state.iteration)  # fault injection counts from the resumed step
        for r in self.records["rollbacks"]:
            if r["skip_to"] > state.iteration:
                say(f"[stability] rollback {r['number']}: iterations {r['skip_from']}..{r['skip_to']} "
                    f"will be skipped (their batches are consumed untrained), {r['reason']}")

    # ---- rollback skip ranges -------------------------------------------------------------------
    def skip_rolled_back(self, data_iterator, num_micro: int, step_batch: int) -> bool:
        """If the next iteration lies in a rollback range: consume its batch without training,
        advance the iteration and the data position, and return True."""
        nxt = self.state.iteration + 1
        if not any(r["skip_from"] <= nxt <= r["skip_to"] for r in self.records["rollbacks"]):
            return False
        from longcat_megatron.training.faults import note_progress

        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        for it in iterators:
            for _ in range(num_micro):
                next(it)
        start = self.state.consumed_train_samples
        self.state.iteration = nxt
        self.state.consumed_train_samples += step_batch
        note_progress(nxt)
        self.say(f"[stability] iteration {nxt}: batch skipped (rollback range), samples "
                 f"{start}..{start + step_batch - 1} consumed untrained")
        return True

    # ---- the step -------------------------------------------------------------------------------
    def _spike_threshold(self) -> Optional[float]:
        if not self.t.spike_factor or len(self.history) < _MIN_HISTORY:
            return None
        return self.t.spike_factor * statistics.median(self.history[-self.t.spike_window:])

    def step(self, optimizer, loss: float, step_batch: int):
        """``(update applied, grad norm)``: megatron's ``optimizer.step()`` unless ``loss`` is
        non-finite or a spike; a skipped step is logged and counted."""
        iteration = self.state.iteration + 1
        why = None
        if self.t.skip_non_finite and not math.isfinite(loss):
            why = f"non-finite loss ({loss})"
        else:
            limit = self._spike_threshold()
            if limit is not None and loss > limit:
                why = (f"loss spike ({loss:.4f} > {self.t.spike_factor:g} x median "
                       f"{limit / self.t.spike_factor:.4f} of the last accepted losses)")
        grad_norm = None
        if why is None:
            ok, grad_norm, _ = optimizer.step()
            if not ok:
                why = "non-finite gradients (megatron's found_inf check)"
            elif grad_norm is not None and not math.isfinite(float(grad_norm)):
                self._skipped(iteration, step_batch, f"non-finite gradient norm ({float(grad_norm)}) "
                              "after the update (fp32 without the distributed optimizer has no "
                              "pre-update check): the weights are corrupt", fatal=True)
                return True, grad_norm
        if why is not None:
            self._skipped(iteration, step_batch, why)
            return False, None
        if math.isfinite(loss):
            self.history = (self.history + [loss])[-self.t.spike_window:]
        self._remember()
        return True, grad_norm

    def _skipped(self, iteration: int, step_batch: int, why: str, fatal: bool = False) -> None:
        start = self.state.consumed_train_samples
        self.unstable = [i for i in self.unstable + [iteration]
                         if i > iteration - self.t.instability_window]
        self._remember()
        limit = self.t.instability_limit
        self.say(f"[stability] iteration {iteration}: {why}: "
                 f"{'update applied' if fatal else 'update skipped'}; batch = samples "
                 f"{start}..{start + step_batch - 1} of the global order (data position {start}); "
                 f"{len(self.unstable)} unstable step(s) in the last {self.t.instability_window} "
                 f"iterations (limit {limit or 'off'})")
        if fatal:
            self._fatal = why

    def _remember(self) -> None:
        self.state.extra["stability"] = {"unstable": self.unstable, "losses": self.history}

    # ---- after the step -------------------------------------------------------------------------
    def action(self, requeue_code: int):
        """None to go on, else ``(exit code, reason)``: the instability limit was reached (or a
        fatal step seen); prints the operator's message, records it, and (with rollback) the skip
        range. Call after the step's bookkeeping, on every rank."""
        fatal = self._fatal
        limit = self.t.instability_limit
        if fatal is None and not (limit and len(self.unstable) >= limit):
            return None
        self.stopped = True
        first, last = (self.unstable[0], self.unstable[-1]) if self.unstable else (
            self.state.iteration, self.state.iteration)
        good = last_good_checkpoint(self.save_dir, first)
        where = (f"{self.save_dir}/iter_{good:07d} (iteration {good})" if good is not None
                 else "none (no committed checkpoint before the instability)")
        what = fatal or (f"{len(self.unstable)} unstable step(s) within {self.t.instability_window} "
                         f"iterations (iterations {', '.join(map(str, self.unstable))})")
        rollbacks = self.records["rollbacks"]
        if (self.t.spike_rollback and fatal is None and good is not None
                and len(rollbacks) < self.t.spike_rollback_max):
            skip_to = last + self.t.spike_skip_batches
            record = {"number": len(rollbacks) + 1, "skip_from": first, "skip_to": skip_to,
                      "checkpoint": good, "reason": what}
            self._record("rollbacks", record)
            self.say(f"[stability] {what}: rolling back (rollback {record['number']} of at most "
                     f"{self.t.spike_rollback_max}): the next start resumes from the last committed "
                     f"checkpoint and skips iterations {first}..{skip_to} (the unstable batches and "
                     f"{self.t.spike_skip_batches} more); exiting {requeue_code} for the requeue")
            return requeue_code, "spike rollback"
        why_not = ""
        if self.t.spike_rollback and fatal is None:
            why_not = (" (no rollback: " + ("no committed checkpoint to return to" if good is None
                       else f"train.spike_rollback_max={self.t.spike_rollback_max} rollbacks done") + ")")
        message = (f"{what}{why_not}: stopping for instability (exit {EXIT_UNSTABLE}, not requeued). "
                   f"Last good checkpoint: {where}. Look at the data around the logged data "
                   "positions and the loss/grad-norm curves, then resume (e.g. lower the LR, or "
                   "train.spike_rollback=true to skip the batches)")
        self._record("stops", {"iteration": self.state.iteration, "message": message,
                               "last_good_checkpoint": good})
        self.say(f"[stability] {message}")
        return EXIT_UNSTABLE, "instability"

    def _record(self, kind: str, entry: dict) -> None:
        self.records[kind].append(entry)
        if self.save_dir and self.rank == 0:
            _write_records(self.save_dir, self.records)
