"""Schedules that obey and stages that chain (one gloo process; several runs in it).

* A resume with a changed LR / WSD decay length / global batch applies the new schedule from the
  resumed iteration (the LR of every later step is the new definition's value), logs each change, and
  the checkpoint records the full definition; a train_iters below the checkpoint's iteration is
  refused naming the field and both values.
* A new stage (checkpoint.load=PREVIOUS + reset_schedule) trains its own iterations with its own LR
  and keeps Adam's state; finetune drops it; a resubmitted stage resumes its own checkpoint, never
  the previous stage's.
"""

from __future__ import annotations

import contextlib
import io
import math

from tests.harness import run_distributed
from tests.train_utils import TINY

BASE = ["parallel.distributed_optimizer=true", "logging.log_interval=1"]


def _train(overrides: list) -> dict:
    """Train in this process; return LRs/losses per iteration, the log text, result fields."""
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(load_config(TINY, BASE + overrides))
    return {"lrs": dict(result.lrs), "losses": dict(result.losses), "iteration": result.iteration,
            "resumed_from": result.resumed_from, "log": out.getvalue()}


def _adam_steps(iter_dir: str) -> set:
    """Adam's step counts stored in a checkpoint (one per param group)."""
    from megatron.core import dist_checkpointing

    groups = dist_checkpointing.load_common_state_dict(iter_dir)["optimizer"]["optimizer"]["param_groups"]
    return {float(g["step"]) for g in groups}


def _schedule_session(tmp: str) -> dict:
    from megatron.core import dist_checkpointing

    ck = f"{tmp}/run"
    wsd = ["schedule.style=wsd", "schedule.warmup_iters=2", "optimizer.min_lr=1e-4"]
    first = _train(wsd + ["optimizer.lr=1e-3", "schedule.wsd_decay_iters=2", "train.train_iters=8",
                          "train.exit_interval=4", f"checkpoint.save={ck}"])
    saved = dist_checkpointing.load_common_state_dict(f"{ck}/iter_0000004")["schedule"]
    second = _train(wsd + ["optimizer.lr=5e-2", "schedule.wsd_decay_iters=3", "train.train_iters=8",
                           "train.global_batch_size=16", f"checkpoint.save={ck}"])
    resaved = dist_checkpointing.load_common_state_dict(f"{ck}/iter_0000008")["schedule"]
    try:
        _train(wsd + ["optimizer.lr=5e-2", "schedule.wsd_decay_iters=3", "train.train_iters=6",
                      f"checkpoint.save={ck}"])
        refused = None
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        refused = f"{type(e).__name__}: {e}"
    return {"first": first, "second": second, "saved": saved, "resaved": resaved, "refused": refused}


def _wsd_lr(n: int, lr: float, min_lr: float, warmup: int, decay: int, wsd: int) -> float:
    if n <= warmup:
        return lr * n / warmup
    if n <= decay - wsd:
        return lr
    return min_lr + (lr - min_lr) * (1 - (n - (decay - wsd)) / wsd)


def test_changed_schedule_is_applied_from_the_resumed_iteration(tmp_path):
    r = run_distributed(_schedule_session, 1, str(tmp_path))[0]
    first, second = r["first"], r["second"]
    assert first["iteration"] == 4 and second["resumed_from"] == 4 and second["iteration"] == 8
    assert sorted(first["lrs"]) == [1, 2, 3, 4]
    for n, lr in first["lrs"].items():
        assert math.isclose(lr, _wsd_lr(n, 1e-3, 1e-4, 2, 8, 2), rel_tol=1e-9), (n, lr)
    # iterations 5..8 follow the NEW definition (lr 5e-2, WSD decay over the last 3 iterations)
    assert sorted(second["lrs"]) == [5, 6, 7, 8]
    for n, lr in second["lrs"].items():
        assert math.isclose(lr, _wsd_lr(n, 5e-2, 1e-4, 2, 8, 3), rel_tol=1e-9), (n, lr)
    log = second["log"]
    for change in ("optimizer.lr: 0.001 -> 0.05", "schedule.wsd_decay_iters: 2 -> 3",
                   "train.global_batch_size: 8 -> 16"):
        assert f"[schedule] changed on resume, applied from iteration 4: {change}" in log, log
    assert "train.train_iters" not in log  # unchanged fields are not reported
    # the checkpoint records the full definition, WSD decay length included
    assert r["saved"]["schedule.wsd_decay_iters"] == 2 and r["saved"]["optimizer.lr"] == 1e-3
    assert r["saved"]["train.global_batch_size"] == 8 and r["saved"]["schedule.decay_iters"] == 8
    assert r["resaved"]["schedule.wsd_decay_iters"] == 3 and r["resaved"]["optimizer.lr"] == 5e-2
    assert r["refused"] and "ScheduleChangeError" in r["refused"]
    assert "train.train_iters=6 is below the checkpoint's iteration 8" in r["refused"]
    assert "saved with train.train_iters=8" in r["refused"]


def _stage_session(tmp: str) -> dict:
    pre, mid, ft = f"{tmp}/pre", f"{tmp}/mid", f"{tmp}/ft"
    _train(["train.train_iters=6", f"checkpoint.save={pre}"])
    stage = [f"checkpoint.load={pre}", "checkpoint.reset_schedule=true", "optimizer.lr=5e-3",
             "optimizer.min_lr=5e-4", "schedule.warmup_iters=1", f"checkpoint.save={mid}"]
    mid_a = _train(stage + ["train.train_iters=4", "train.exit_interval=2"])
    mid_b = _train(stage + ["train.train_iters=4"])  # the requeued/resubmitted stage
    finetune = [f"checkpoint.load={pre}", "checkpoint.finetune=true", f"checkpoint.save={ft}"]
    fresh = _train(finetune + ["train.train_iters=2"])
    fresh_again = _train(finetune + ["train.train_iters=3"])  # resumes ft in full, Adam included
    return {"mid_a": mid_a, "mid_b": mid_b, "fresh": fresh, "fresh_again": fresh_again,
            "adam_pre": _adam_steps(f"{pre}/iter_0000006"), "adam_mid": _adam_steps(f"{mid}/iter_0000004"),
            "adam_ft": _adam_steps(f"{ft}/iter_0000002"), "adam_ft_again": _adam_steps(f"{ft}/iter_0000003")}


def test_stage_chaining_keeps_or_drops_adam_and_resumes_its_own_checkpoint(tmp_path):
    r = run_distributed(_stage_session, 1, str(tmp_path))[0]
    a, b = r["mid_a"], r["mid_b"]
    # the new stage counts its own iterations from 0 and trains with its own schedule
    assert a["resumed_from"] is None and sorted(a["losses"]) == [1, 2]
    assert f"starting a new stage from the weights and optimizer state of {tmp_path}/pre/iter_0000006" in a["log"]
    cosine = lambda n: 5e-4 + 0.5 * (5e-3 - 5e-4) * (1 + math.cos(math.pi * (n - 1) / 3))  # noqa: E731
    assert sorted({**a["lrs"], **b["lrs"]}) == [1, 2, 3, 4]
    for n, lr in {**a["lrs"], **b["lrs"]}.items():
        assert math.isclose(lr, cosine(n), rel_tol=1e-9), (n, lr)
    # resubmitted with the same overrides: resumes its own checkpoint, not the previous stage's
    assert b["resumed_from"] == 2 and sorted(b["losses"]) == [3, 4], b["log"]
    assert f"{tmp_path}/mid holds this run's own checkpoint: resuming it" in b["log"]
    # Adam's state: reset_schedule keeps it (6 + 4 steps), finetune drops it (2 steps)
    assert r["adam_pre"] == {6.0} and r["adam_mid"] == {10.0} and r["adam_ft"] == {2.0}
    # finetune=true still set on resubmission: the stage's own checkpoint is resumed with its optimizer
    assert r["fresh_again"]["resumed_from"] == 2 and r["adam_ft_again"] == {3.0}
