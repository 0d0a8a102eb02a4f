"""The training loop: data -> megatron-core forward/backward schedule -> optimizer -> checkpoint.

Runs on every rank (started by torchrun or srun). The model is whatever
:func:`longcat_megatron.model.factory.build_model_chunk` builds; the loop never looks inside it beyond
the optional hooks ``on_train_step_end`` and ``training_metrics``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from longcat_megatron import runtime
from longcat_megatron.config import RunConfig, save_config
from longcat_megatron.model.document_mask import DocumentMask
from longcat_megatron.training import batch_schedule
from longcat_megatron.training import checkpointing as ckpt
from longcat_megatron.training import replica_check
from longcat_megatron.training.checkpoint_lock import lock_save_dir
from longcat_megatron.training import sdc
from longcat_megatron.training.faults import (
    install_bit_flip, install_failure_recorder, maybe_corrupt_loss, maybe_inject, note_progress,
)
from longcat_megatron.training.progress import ProgressLogger
from longcat_megatron.training.setup import (
    build_model,
    build_optimizer,
    build_scheduler,
    parameters_on_rank,
    model_hook,
    sync_params,
)
from longcat_megatron.training.schedule import (
    group_schedule_values, restore_group_schedule_values, schedule_changes, schedule_definition,
)
from longcat_megatron.training.router_stability import RouterStability
from longcat_megatron.training.signals import EXIT_REQUEUE, StopRequest, job_start_time
from longcat_megatron.training.stability import StabilityGuard
from longcat_megatron.training.watchdog import HangWatchdog


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back."""

    iteration: int
    losses: dict = field(default_factory=dict)  # iteration -> global loss
    grad_norms: dict = field(default_factory=dict)
    lrs: dict = field(default_factory=dict)  # iteration -> LR set for the next step
    valid_losses: dict = field(default_factory=dict)
    exit_code: int = 0
    stop_reason: Optional[str] = None
    resumed_from: Optional[int] = None
    checkpoint: Optional[str] = None
    ignored_checkpoints: list = field(default_factory=list)
    # The trained model chunks (DDP-wrapped), for callers in the same process (tests, tools).
    model_chunks: list = field(default_factory=list, repr=False)


def _batch_to_device(batch: dict) -> dict:
    dev = runtime.device()
    return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _cp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size()


def batch_on_this_cp_rank(batch: dict) -> dict:
    """This context-parallel rank's part of a micro-batch: megatron's load-balanced causal split
    (sequence chunks r and 2*CP-1-r of 2*CP); a ``DocumentMask`` describes the whole sequence and
    stays whole (the attention gathers every key)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    mask = batch.get("attention_mask")
    documents = mask if isinstance(mask, DocumentMask) else None
    batch = get_batch_on_this_cp_rank({**batch, "attention_mask": None if documents else mask})
    if documents is not None:
        batch["attention_mask"] = documents
    return batch


def _reads_document_masks(model) -> bool:
    """Whether the (wrapped) model takes a ``DocumentMask`` as its attention mask (LongCat)."""
    while not hasattr(model, "reads_document_masks") and hasattr(model, "module"):
        model = model.module                                  # DDP / Float16Module wrappers
    return bool(getattr(model, "reads_document_masks", False))


def forward_step(data_iterator, model):
    """One micro-batch: returns the per-token loss and the reduction function (megatron contract)."""
    batch = _batch_to_device(next(data_iterator))
    mask = batch.get("attention_mask")
    if isinstance(mask, DocumentMask) and not _reads_document_masks(model):
        # megatron's GPTModel (model.arch: gpt) takes the dense [b, 1, s, s] mask it stands for.
        batch["attention_mask"] = mask.dense(runtime.device())
    if _cp_size() > 1:
        batch = batch_on_this_cp_rank(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = maybe_corrupt_loss(torch.sum(losses * mask))  # fault injection (tests); else unchanged
    sdc.validate_loss(loss)  # megatron's rerun state machine (train.rerun_mode)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def _global_loss(reports: list) -> float:
    """Token-weighted loss of the global batch, identical on every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].double().cpu()
    if dist.is_initialized():
        from longcat_megatron import collectives

        collectives.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            collectives.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


def evaluate(model: list, valid_factory, cfg: RunConfig, num_micro: int) -> Optional[float]:
    """Token-weighted loss over ``train.eval_iters`` global batches of the validation split."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if valid_factory is None:
        return None
    t = cfg.train
    n_chunks = len(model)
    iterators = [valid_factory() for _ in range(n_chunks)]
    reports = []
    for m in model:
        m.eval()
    with torch.no_grad():
        for _ in range(t.eval_iters):
            reports += get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators[0] if n_chunks == 1 else iterators,
                model=model if n_chunks > 1 else model[0],
                num_microbatches=num_micro,
                seq_length=cfg.data.seq_length,
                micro_batch_size=t.micro_batch_size,
                forward_only=True,
            )
    for m in model:
        m.train()
    return _global_loss(reports)


def _metrics(model_chunks: list) -> dict:
    """The models' metrics (``progress/*`` keys also go on the progress line)."""
    merged: dict = {}
    for fn in model_hook(model_chunks, "training_metrics"):
        merged.update(fn() or {})
    return merged


def _build_iterators(cfg: RunConfig, layout: runtime.Layout, consumed: int):
    from megatron.core import parallel_state as ps

    from longcat_megatron.data import pretrain

    t = cfg.train
    train_samples = batch_schedule.samples_for_iterations(t.train_iters, t.global_batch_size,
                                                          t.batch_schedule, cfg.data.seq_length)
    # The same validation samples at every evaluation, so the curve compares like with like.
    eval_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    builder = pretrain.build_pretrain_iterators
    if cfg.data.sft:
        from longcat_megatron.data import sft

        builder = sft.build_sft_iterators
    train_iter, valid_factory = builder(
        cfg.data,
        seed=t.seed,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        train_samples=train_samples,
        eval_samples=eval_samples,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        consumed_train_samples=consumed,
    )
    # Each virtual pipeline chunk reads the same micro-batch sequence (first chunk: inputs, last
    # chunk: labels); tee shares one dataset instead of building it once per chunk.
    n_chunks = layout.virtual_pipeline or 1
    iters = list(itertools.tee(train_iter, n_chunks)) if n_chunks > 1 else [train_iter]
    return iters, valid_factory


def startup_block(cfg: RunConfig, layout: runtime.Layout, params_on_rank: int, load_dir, save_dir) -> str:
    """The one block an operator reads first: layout, size, tokens per step, where things go."""
    t, d = cfg.train, cfg.data
    num_micro = t.global_batch_size // (t.micro_batch_size * layout.data)
    lines = [
        "=" * 78,
        f" longcat-megatron | model.arch={cfg.model.arch} | {layout.describe()}",
        f" parameters on rank 0: {params_on_rank / 1e6:.2f}M | sequence parallel: "
        f"{cfg.parallel.sequence_parallel} | distributed optimizer: {cfg.parallel.distributed_optimizer}",
        f" global batch {t.global_batch_size} x seq {d.seq_length} = "
        f"{t.global_batch_size * d.seq_length:,} tokens/step | micro-batch {t.micro_batch_size} x "
        f"{num_micro} micro-batches per DP rank | {t.train_iters} iterations",
        f" data: {'synthetic (data.mock)' if d.mock else d.paths}",
        f" checkpoints: save={save_dir or '-'} load={load_dir or '-'} "
        f"every {cfg.checkpoint.save_interval or 'end only'} | tensorboard: {cfg.logging.tensorboard_dir or '-'}",
        "=" * 78,
    ]
    return "\n".join(lines)


def train(cfg: RunConfig, layout: Optional[runtime.Layout] = None) -> TrainResult:
    """Train according to ``cfg``; resumes from the latest committed checkpoint when there is one."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    p, t = cfg.parallel, cfg.train
    if layout is None:
        from longcat_megatron.training import determinism

        determinism.configure(t.deterministic)  # before any NCCL communicator exists
        layout = runtime.initialize(
            tensor=p.tensor, pipeline=p.pipeline, context=p.context, expert=p.expert,
            virtual_pipeline=p.virtual_pipeline, num_experts=cfg.model.num_experts,
            seed=t.seed, backend=p.backend, expert_tensor=p.expert_tensor,
        )
    if t.global_batch_size % (t.micro_batch_size * layout.data):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel size ({layout.data})"
        )
    num_micro = t.global_batch_size // (t.micro_batch_size * layout.data)
    batches = batch_schedule.check(t.global_batch_size, t.batch_schedule, t.micro_batch_size, layout.data)
    rank = dist.get_rank()

    model = build_model(cfg, layout)
    install_bit_flip(model)  # fault injection (SDC tests); else nothing
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    tf_config = model[0].config
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.grad_scale_func = optimizer.scale_loss
    if len(model) == 1:
        tf_config.no_sync_func = model[0].no_sync
    else:
        tf_config.no_sync_func = [m.no_sync for m in model]

    c = cfg.checkpoint
    save_dir = c.save
    save_dir_lock = lock_save_dir(save_dir)  # one run per checkpoint directory
    # Resubmitting the same job resumes it; checkpoint.load only seeds a stage until it has its own.
    load_dir, own_checkpoint = ckpt.resume_source(c.save, c.load)
    # Rank 0 writes the progress line (the job log; other ranks log to their own files): the loss
    # and grad norm are global; the model's progress/* figures are those of rank 0's stage.
    from longcat_megatron.model.flops import training_flops_per_token
    from longcat_megatron.training.progress import device_peak_tflops

    log = ProgressLogger(rank == 0, t.train_iters, t.global_batch_size * cfg.data.seq_length,
                         cfg.logging.tensorboard_dir, cfg.logging.log_interval,
                         flops_per_token=partial(training_flops_per_token, cfg.model, cfg.data.seq_length),
                         world_size=dist.get_world_size(),
                         peak_tflops=cfg.logging.peak_tflops or device_peak_tflops(), run_config=cfg)
    boot = ProgressLogger(rank == 0, t.train_iters, 0)
    boot.print(startup_block(cfg, layout, parameters_on_rank(model), load_dir, save_dir))

    from longcat_megatron.data import pretrain

    train_samples = batch_schedule.samples_for_iterations(t.train_iters, t.global_batch_size,
                                                          t.batch_schedule, cfg.data.seq_length)
    fingerprint = pretrain.dataset_fingerprint(cfg.data, seed=t.seed, train_samples=train_samples)
    state = ckpt.TrainState()
    result = TrainResult(iteration=0)
    schedule_now = schedule_definition(cfg)
    group_lrs = group_schedule_values(optimizer)  # an optimizer load overwrites them
    if load_dir:
        # finetune/reset_schedule describe how a stage STARTS; its own checkpoints resume in full
        weights_only = c.finetune and not own_checkpoint
        fresh_schedule = (c.finetune or c.reset_schedule) and not own_checkpoint
        if own_checkpoint and c.load and load_dir != c.load:
            boot.print(f"[checkpoint] {save_dir} holds this run's own checkpoint: resuming it "
                       f"(checkpoint.load={c.load} only seeds a run that has none)")
        loaded, state = ckpt.load_checkpoint(
            load_dir, model, optimizer if not weights_only else None,
            scheduler if not fresh_schedule else None,
            load_optimizer=not c.no_load_optim and not weights_only,
            load_rng=not c.no_load_rng and not fresh_schedule,
            load_scheduler=not fresh_schedule,
            verify=c.verify_on_load, fallback_on_corruption=c.fallback_on_corruption,
            fully_parallel=c.fully_parallel_load, optimizer_gather=c.optimizer_gather,
        )
        restore_group_schedule_values(optimizer, group_lrs)
        scheduler.step(increment=0)  # this run's LR/WD at the loaded (or fresh) step count
        result.ignored_checkpoints = list(loaded.ignored)
        for it in loaded.ignored:
            boot.print(f"[checkpoint] ignoring incomplete checkpoint {ckpt.iteration_dir(load_dir, it)} "
                       "(its save never committed: crash or kill during save)")
        if loaded.iteration is None:
            boot.print(f"[checkpoint] no committed checkpoint in {load_dir}: starting from scratch")
        elif fresh_schedule:
            what = "weights" if weights_only else "weights and optimizer state"
            boot.print(f"[checkpoint] starting a new stage from the {what} of {loaded.path}; "
                       "iteration, data position and LR schedule start fresh")
            state = ckpt.TrainState()
        else:
            if state.data_fingerprint:
                pretrain.check_fingerprint(state.data_fingerprint, fingerprint, c.allow_data_change)
            notes = []
            if not loaded.rng_restored:
                notes.append("RNG not restored: world size changed")
            if not loaded.optimizer_restored:
                notes.append("optimizer state not restored")
            boot.print(f"[checkpoint] resumed from {loaded.path} at iteration {state.iteration} "
                       f"({state.consumed_train_samples} samples consumed"
                       + "".join(f"; {n}" for n in notes) + ")")
            result.resumed_from = state.iteration
            for change in schedule_changes(state.schedule, schedule_now, state.iteration):
                boot.print(f"[schedule] changed on resume, applied from iteration {state.iteration}: "
                           f"{change}")
    state.data_fingerprint = fingerprint
    state.schedule = schedule_now

    iterators, valid_factory = _build_iterators(cfg, layout, state.consumed_train_samples)
    raw_iterator = iterators[0] if len(iterators) == 1 else iterators  # what a rollback skips over
    corruption = sdc.SdcGuard(cfg, model, save_dir, rank, boot.print)
    data_iterator = corruption.wrap(iterators)  # for the rerun state machine and the replay check
    forward_backward = get_forward_backward_func()
    stop = StopRequest(t.exit_signal_handler, t.exit_duration_mins, started_at=job_start_time())
    async_queue = None
    if c.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()

    def write_config(path: str) -> None:
        save_config(cfg, path)

    def save() -> str:
        sync_params(model)
        path = ckpt.save_checkpoint(
            save_dir, model, optimizer, scheduler, state, config_yaml_writer=write_config,
            fully_reshardable=c.fully_reshardable, async_save=c.async_save, async_queue=async_queue,
            keep_last=c.keep_last, keep_every=c.keep_every, fully_parallel=c.fully_parallel_save,
            optimizer_gather=c.optimizer_gather,
        )
        boot.print(f"[checkpoint] {'scheduled' if c.async_save else 'saved'} iteration "
                   f"{state.iteration} -> {path}")
        return path

    end_iter = t.train_iters if not t.exit_interval else min(t.train_iters, t.exit_interval)
    log.start(state.iteration, state.consumed_train_samples * cfg.data.seq_length)
    last_saved = state.iteration if result.resumed_from is not None else None
    install_failure_recorder()
    watchdog = HangWatchdog(t.hang_timeout_mins, os.environ.get("LONGCAT_LOG_DIR") or save_dir or ".",
                            rank).start(state.iteration)
    guard = StabilityGuard(cfg, save_dir, state, boot.print, rank)
    probe = RouterStability(cfg.logging.router_stability, cfg.logging.log_interval,
                            cfg.logging.grad_balance_bound, cfg.logging.grad_balance_patience,
                            cfg.model.num_layers, boot.print)
    for m in model:
        m.train()

    def run_forward_backward(num_microbatches: int, iterator=data_iterator, forward_only: bool = False):
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=model if len(model) > 1 else model[0],
            num_microbatches=num_microbatches,
            seq_length=cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    def replay(batches: list):
        """A forward-only pass over one micro-batch per model chunk (the SDC replay check); megatron's
        interleaved schedule needs >= PP micro-batches: micro-batch 0 repeated."""
        n = layout.pipeline if len(model) > 1 else 1
        its = [iter([b] * n) for b in batches]
        return run_forward_backward(n, its[0] if len(its) == 1 else its, forward_only=True)

    def zero_grads():
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()

    sdc_fault = None
    while state.iteration < end_iter:
        zero_grads()
        step_batch = batch_schedule.batch_at(state.consumed_train_samples, cfg.data.seq_length,
                                             t.global_batch_size, batches)
        micro_batches = step_batch // (t.micro_batch_size * layout.data)
        if guard.skip_rolled_back(raw_iterator, micro_batches, step_batch):
            watchdog.beat(state.iteration)
            continue
        probe.arm(model, state.iteration + 1)
        reports, sdc_fault = corruption.step(state.iteration + 1, data_iterator,
                                             partial(run_forward_backward, micro_batches), zero_grads, replay)
        if sdc_fault:
            result.exit_code, result.stop_reason = sdc.EXIT_SDC, sdc_fault
            break
        if t.check_replicas_interval and (state.iteration + 1) % t.check_replicas_interval == 0:
            replica_check.check(model, state.iteration + 1)  # what this step's forward read
        router_metrics = probe.collect()
        loss = _global_loss(reports)
        ok, grad_norm = guard.step(optimizer, loss, step_batch)  # megatron's step unless non-finite/spike
        if ok:
            scheduler.step(increment=1)
        for hook in model_hook(model, "on_train_step_end"):
            hook(state.iteration + 1)
        state.iteration += 1
        state.consumed_train_samples += step_batch
        note_progress(state.iteration)
        watchdog.beat(state.iteration)
        result.losses[state.iteration] = loss
        result.grad_norms[state.iteration] = float(grad_norm) if grad_norm is not None else float("nan")
        lr = optimizer.param_groups[0]["lr"]
        result.lrs[state.iteration] = lr
        log.step(state.iteration, {"loss": loss, "lr": lr, "grad_norm": result.grad_norms[state.iteration]},
                 {**_metrics(model), **router_metrics}, tokens=state.consumed_train_samples * cfg.data.seq_length)
        unstable = guard.action(EXIT_REQUEUE)
        if unstable:
            result.exit_code, result.stop_reason = unstable
            break
        if t.eval_interval and state.iteration % t.eval_interval == 0:
            val = evaluate(model, valid_factory, cfg, num_micro)
            if val is not None:
                result.valid_losses[state.iteration] = val
                log.print(f"[eval] iteration {state.iteration}: validation loss {val:.4f} "
                          f"({t.eval_iters} batches)")
                log.scalar("valid/loss", val, state.iteration)
        if async_queue is not None:
            ckpt.finalize_async_saves(async_queue)
        maybe_inject("signal_after_step", state.iteration, rank)
        maybe_inject("crash_after_step", state.iteration, rank)
        maybe_inject("hang_after_step", state.iteration, rank)
        watchdog.beat()  # evaluation and async-save finalization are not hangs either
        reason = stop.agreed()
        if save_dir and c.save_interval and state.iteration % c.save_interval == 0:
            result.checkpoint = save()
            last_saved = state.iteration
            log.start(state.iteration, state.consumed_train_samples * cfg.data.seq_length)  # keep save time out of the next step's throughput
            watchdog.beat()
        if reason:
            boot.print(f"[stop] {reason} received: saving and exiting for requeue")
            if save_dir and last_saved != state.iteration:
                result.checkpoint = save()
                last_saved = state.iteration
            result.exit_code = EXIT_REQUEUE
            result.stop_reason = reason
            break
    # Not after an instability stop or a detected fault: their state is not worth keeping.
    if save_dir and last_saved != state.iteration and not guard.stopped and not sdc_fault:
        result.checkpoint = save()
    corruption.close()
    watchdog.beat()  # the wait for a background save below is not a step either
    if async_queue is not None:
        ckpt.finalize_async_saves(async_queue, blocking=True)
        async_queue.close()
    watchdog.stop()
    stop.restore()
    save_dir_lock.release()
    log.close()
    result.iteration = state.iteration
    sync_params(model)
    result.model_chunks = model
    if log.history:
        first, last = log.history[0], log.history[-1]
        log.print(f"[done] iteration {state.iteration}: loss {first[1]:.4f} (iter {first[0]}) -> "
                  f"{last[1]:.4f} (iter {last[0]})"
                  + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return result
