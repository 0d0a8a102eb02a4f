"""The LR schedule's definition: what a checkpoint records, and what happens when a resume changes it.

A checkpoint saves the full definition (:func:`schedule_definition`: LR, min-LR, weight decay,
style, warmup, decay length, WSD decay length and shape, train iterations, global batch) next to
megatron-core's scheduler state. On resume the scheduler is always built from the *current* config
and only its step counter comes from the checkpoint (megatron's ``override_opt_param_scheduler``),
so a changed field takes effect from the resumed iteration on; :func:`schedule_changes` lists the
changes for the log. The one change that is refused is a ``train.train_iters`` below the
checkpoint's iteration (the run would have nothing left to train): the message names both values.
"""

from __future__ import annotations

from longcat_megatron.errors import UserInputError


class ScheduleChangeError(UserInputError):
    """A resumed run's schedule cannot continue from the checkpoint; the message says why."""


def schedule_definition(cfg) -> dict:
    """Every config value the LR/WD schedule and the iteration budget depend on, by config field."""
    s, o, t = cfg.schedule, cfg.optimizer, cfg.train
    wsd = s.style == "wsd"
    return {
        "optimizer.lr": float(o.lr),
        "optimizer.min_lr": float(o.min_lr),
        "optimizer.weight_decay": float(o.weight_decay),
        "schedule.style": s.style,
        "schedule.warmup_iters": int(s.warmup_iters),
        "schedule.decay_iters": int(s.decay_iters or t.train_iters),  # resolved: the length in use
        "schedule.wsd_decay_iters": int(s.wsd_decay_iters) if wsd else 0,
        "schedule.wsd_decay_style": s.wsd_decay_style if wsd else None,
        "train.train_iters": int(t.train_iters),
        "train.global_batch_size": int(t.global_batch_size),
    }


_STYLE_FROM_MEGATRON = {"WSD": "wsd"}


def definition_from_scheduler_state(state: dict) -> dict:
    """The part of the definition a checkpoint without one (older format) still tells: megatron's
    scheduler state dict (no WSD decay length, no train iterations or batch)."""
    if not state:
        return {}
    style = state.get("lr_decay_style")
    return {
        "optimizer.lr": float(state.get("max_lr", state.get("start_lr"))),
        "optimizer.min_lr": float(state["min_lr"]),
        "schedule.style": _STYLE_FROM_MEGATRON.get(style, style),
        "schedule.warmup_iters": int(state["lr_warmup_steps"]),
        "schedule.decay_iters": int(state["lr_decay_steps"]),
    }


def schedule_changes(saved: dict, current: dict, iteration: int) -> list[str]:
    """``field: old -> new`` for each field that differs (fields the checkpoint lacks are skipped).

    Raises :class:`ScheduleChangeError` when ``train.train_iters`` drops below ``iteration``.
    """
    old_iters = saved.get("train.train_iters")
    new_iters = current["train.train_iters"]
    if new_iters < iteration:
        raise ScheduleChangeError(
            f"train.train_iters={new_iters} is below the checkpoint's iteration {iteration} "
            f"(the checkpoint was saved with train.train_iters={old_iters}): nothing is left to "
            f"train. Set train.train_iters >= {iteration}, or start a new stage from this "
            "checkpoint (checkpoint.load=DIR with checkpoint.finetune=true or "
            "checkpoint.reset_schedule=true and another checkpoint.save)"
        )
    return [f"{name}: {saved[name]!r} -> {value!r}" for name, value in current.items()
            if name in saved and saved[name] != value]


_GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


def group_schedule_values(optimizer) -> list:
    """Each param group's LR bounds as this run's config set them (megatron keeps them per group)."""
    return [{k: g[k] for k in _GROUP_SCHEDULE_KEYS if k in g} for g in optimizer.param_groups]


def restore_group_schedule_values(optimizer, values: list) -> None:
    """Put back the config's per-group LR bounds after an optimizer load overwrote them with the
    checkpoint's (param groups are saved with the optimizer)."""
    groups = optimizer.param_groups
    if len(groups) != len(values):
        raise RuntimeError(f"optimizer has {len(groups)} param groups after loading, {len(values)} before")
    for group, saved in zip(groups, values):
        group.update(saved)


def resume_scheduler(scheduler, saved_state: dict) -> None:
    """Continue ``scheduler`` (built from the current config) at the checkpoint's step count.

    Only ``num_steps`` is taken from the checkpoint: the LR/WD values are those of the current
    definition at that step (megatron's ``override_opt_param_scheduler`` behaviour)."""
    scheduler.num_steps = 0
    scheduler.step(increment=int(saved_state.get("num_steps", saved_state.get("num_iters", 0))))
