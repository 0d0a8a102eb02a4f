"""Distributed checkpoints (megatron-core ``dist_checkpointing``, torch_dist format) with a commit rule.

Layout (Megatron-LM's)::

    SAVE_DIR/latest_checkpointed_iteration.txt   # written last, atomically: the commit point
    SAVE_DIR/iter_0000100/                       # torch_dist shards + common state
    SAVE_DIR/iter_0000100/run_config.yaml        # the resolved config of the run that saved it

A checkpoint counts only once the tracker names it. A directory newer than the tracker (a crash while
saving) is ignored on load and reported. Every committed checkpoint carries ``checksums.json`` (a
SHA-256 per file, taken while writing) that load verifies; a run holds ``SAVE_DIR/.lock`` while it
runs; nothing at or below the tracker's iteration, and no complete checkpoint, is ever deleted except
by the retention policy (``keep_last``/``keep_every``): see training/checkpoint_integrity.py.

A checkpoint holds the model, the optimizer (in megatron's
``fully_reshardable`` format by default, so TP/PP/EP/DP may change on resume), the LR scheduler, the
iteration, consumed samples, the data fingerprint and every rank's RNG state: resuming is exact.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from longcat_megatron import collectives
from longcat_megatron.errors import UserInputError
from longcat_megatron.training import checkpoint_integrity as integrity
from longcat_megatron.training.faults import maybe_inject
from longcat_megatron.training.optimizer_checkpoint import (  # noqa: F401 (re-exported)
    OPTIMIZER_GATHERS,
    PER_PARAM,
    _ParamStateOverride,
    _drop_param_state,
    _load_per_param_state,
    _optimizer_metadata,
    _optimizers,
    _per_param_load_plan,
    _per_param_save_state,
)
from longcat_megatron.training.schedule import definition_from_scheduler_state, resume_scheduler
from longcat_megatron.training.setup import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_NAME = "run_config.yaml"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(UserInputError):
    """A checkpoint cannot be used; the message names the directory and the way out."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """Iteration named by the tracker file, or None when there is no committed checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{path} holds {text!r}, not an iteration number; fix or delete it to start over"
        )
    return int(text)


def _write_tracker(root: str, iteration: int) -> None:
    path = os.path.join(root, TRACKER)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_iterations(root: str) -> list[int]:
    """All ``iter_*`` directories present (committed or not)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m)


def uncommitted_iterations(root: str) -> list[int]:
    """``iter_*`` directories newer than the tracker: leftovers of a save that did not finish."""
    latest = read_tracker(root)
    return [i for i in list_iterations(root) if latest is None or i > latest]


# ------------------------------------------------------------------------- optimizer (torch Adam)
def _keeps_step_per_param(inner) -> bool:
    """torch's Adam/AdamW keep ``step`` in each parameter's state; TE's and apex's FusedAdam (what
    megatron uses when either is installed) keep it in the param group."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _ensure_optimizer_state(optimizer) -> None:
    """Give every parameter the optimizer state its inner optimizer really has, before megatron builds
    a save/load template from it: an optimizer has no state before its first step.

    The moments come from megatron's own ``init_state_fn`` (``exp_avg`` / ``exp_avg_sq``, or TE's
    ``initialize_state`` for the precision-aware optimizer); only torch Adam also gets a per-param
    ``step`` (its ``DistributedOptimizer.state_dict`` reads it there; FusedAdam's ``step`` is in the
    param group, and megatron's restore copies every key of a state from the checkpoint, which holds
    no ``step``: a torch-Adam ``step`` in a FusedAdam state was ``KeyError: 'step'`` on resume)."""
    for sub in _optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        empty = [p for g in inner.param_groups for p in g["params"] if not inner.state[p]]
        if not empty:
            continue
        init_state_fn = getattr(sub, "init_state_fn", None)
        if init_state_fn is not None:
            init_state_fn(inner, getattr(sub, "config", None))
        else:  # megatron built no init function (not Adam): the moments Adam would create
            for p in empty:
                inner.state[p]["exp_avg"] = torch.zeros_like(p)
                inner.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        if _keeps_step_per_param(inner):
            for p in empty:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _unshare_step(optimizer) -> None:
    """megatron's load puts one shared ``step`` tensor in every param's state; torch Adam increments
    it in place per param, so each param needs its own copy."""
    for sub in _optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()


def _param_group_union(commons: list) -> list:
    """All saved param groups, plus copies with ``is_expert_parallel`` flipped, so that optimizers
    of another EP layout find their groups by megatron's identifier keys (originals win)."""
    groups = [g for c in commons for g in c["optimizer"]["param_groups"]]
    flipped = [{**g, "is_expert_parallel": not g["is_expert_parallel"]}
               for g in groups if "is_expert_parallel" in g]
    return flipped + groups


def _adapt_chained(loaded: dict, optimizer) -> dict:
    """Reconcile the optimizer's common state with a checkpoint saved with another number of chained
    optimizers (megatron makes a separate expert optimizer only when EP > 1).

    After ``dist_checkpointing.load`` the dict holds the *saved* common part (flat for one optimizer,
    ``{0: .., 1: ..}`` for chained ones) merged with the *template's* sharded tensors. The tensor keys
    match across layouts (fully-reshardable format without chained prefixes); only the common part
    (param groups, sharding type) needs reshaping.
    """
    subs = _optimizers(optimizer)
    int_keys = sorted(k for k in loaded if isinstance(k, int))
    flat = {k: v for k, v in loaded.items() if not isinstance(k, int)}
    saved_chained = [loaded[k] for k in int_keys if "optimizer" in loaded[k]]
    commons = saved_chained or ([flat] if "optimizer" in flat else [])
    if len(subs) == 1:
        if not int_keys:
            return loaded  # same layout
        out = dict(flat)
        base = commons[0]
        out["param_state_sharding_type"] = base.get("param_state_sharding_type")
        out["optimizer"] = {**base["optimizer"], "param_groups": _param_group_union(commons)}
        return out
    if "optimizer" not in flat:
        return loaded  # same layout
    groups = _param_group_union(commons)
    out = {}
    for i in range(len(subs)):
        sub = dict(loaded.get(i, {}))
        for k, v in flat.items():
            sub.setdefault(k, v)
        sub["optimizer"] = {**sub["optimizer"], "param_groups": groups}
        out[i] = sub
    return out


# -------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resume must restore."""

    iteration: int = 0
    consumed_train_samples: int = 0
    data_fingerprint: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # The LR schedule's full definition (training/schedule.py), compared with the config on resume.
    schedule: dict = field(default_factory=dict)


def _model_sharded_state(model_chunks: list) -> dict:
    """Sharded state of the unwrapped chunks (keys as the model names them, no DDP prefix)."""
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _rng_sharded_object(rank: int, world: int):
    """This rank's python/numpy/torch/model-parallel RNG states as one ShardedObject per rank."""
    import random

    import numpy as np
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _restore_rng(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    root: str,
    model_chunks: list,
    optimizer,
    scheduler,
    train_state: TrainState,
    *,
    config_yaml_writer: Optional[Callable[[str], None]] = None,
    fully_reshardable: bool = True,
    async_save: bool = False,
    async_queue=None,
    keep_last: int = 0,
    keep_every: int = 0,
    fully_parallel: bool = False,
    optimizer_gather: str = PER_PARAM,
) -> str:
    """Save a checkpoint of ``train_state.iteration`` under ``root`` and commit it.

    With ``async_save`` the shards are written in the background (megatron-core's async writer) and
    the tracker is committed by :func:`finalize_async_saves` once every rank's shards are durable.
    ``optimizer_gather`` (fully_reshardable only) is how the optimizer state is brought together:
    ``per_param`` (each parameter's on one data-parallel rank), ``all_ranks`` (megatron's default
    all-gather) or ``dp_rank_0`` (megatron's ``mem_efficient`` gather); the files are interchangeable.
    """
    from megatron.core import dist_checkpointing

    rank, world = dist.get_rank(), dist.get_world_size()
    path = iteration_dir(root, train_state.iteration)
    problem = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        try:  # a leftover of a crash at this iteration: never a committed or complete checkpoint
            kept = integrity.clear_for_save(path, train_state.iteration, read_tracker(root))
            if kept:
                print(f"[checkpoint] kept the complete but uncommitted {path} as {kept}", flush=True)
            os.makedirs(path)
        except (OSError, UserInputError) as e:
            problem = e
    _agree(problem, f"the save of {path} was refused on rank 0 (see its message)")
    state: dict[str, Any] = _model_sharded_state(model_chunks)
    model_sd = state.get("model", state.get("model0"))
    if optimizer is not None:
        _check_gather(optimizer_gather)
        _ensure_optimizer_state(optimizer)
        model_for_optimizer = model_sd if len(model_chunks) == 1 else _merged(state)
        metadata = _optimizer_metadata(fully_reshardable, optimizer_gather)
        if fully_reshardable and optimizer_gather == PER_PARAM:
            with _ParamStateOverride(optimizer, _per_param_save_state):
                state["optimizer"] = optimizer.sharded_state_dict(model_for_optimizer, metadata=metadata)
        else:
            state["optimizer"] = optimizer.sharded_state_dict(model_for_optimizer, metadata=metadata)
    state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["iteration"] = train_state.iteration
    state["consumed_train_samples"] = train_state.consumed_train_samples
    state["data_fingerprint"] = train_state.data_fingerprint
    state["extra"] = train_state.extra
    state["schedule"] = train_state.schedule
    state["checkpoint_version"] = FORMAT_VERSION
    state["optimizer_format"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    state["optimizer_gather"] = optimizer_gather if fully_reshardable else None  # informative only
    state["world_size"] = world
    state["rng_state"] = _rng_sharded_object(rank, world)
    needed = integrity.state_bytes(state)
    space = integrity.check_space(root, _sum_over_ranks(needed))
    _agree(integrity.CheckpointSaveError(space) if space else None,
           f"a rank has no space left for the checkpoint in {root} (see its message)")
    integrity.install_digesting_writer()

    iteration = train_state.iteration  # an async commit runs later, when the loop has moved on

    def commit():
        maybe_inject("kill_during_save", iteration, rank)
        if rank == 0:
            if config_yaml_writer is not None:
                config_yaml_writer(os.path.join(path, CONFIG_NAME))
            integrity.write_manifest(path)
            _write_tracker(root, iteration)
            if keep_last > 0:
                prune_checkpoints(root, keep_last, keep_every)

    if async_save:
        request = dist_checkpointing.save(state, path, _parallel_strategy("save", fully_parallel),
                                          async_sharded_save=True)
        request.add_finalize_fn(commit)
        _scheduled_async_saves[:] = [(path, needed)]
        async_queue.schedule_async_request(request)
    else:
        try:
            dist_checkpointing.save(state, path, _parallel_strategy("save", fully_parallel))
        except Exception as e:  # noqa: BLE001 - re-raised, with the cause named when it is known
            described = integrity.describe_save_error(e, path, needed)
            if described is e:
                raise
            raise described from e
        dist.barrier()
        commit()
        dist.barrier()
    return path


def _check_gather(gather: str) -> None:
    if gather not in OPTIMIZER_GATHERS:
        raise CheckpointError(f"checkpoint.optimizer_gather={gather!r}: use one of {list(OPTIMIZER_GATHERS)}")


def _parallel_strategy(action: str, fully_parallel: bool, path: Optional[str] = None):
    """megatron's fully-parallel save/load wrapper over the data-parallel group (each DP replica
    writes/reads a share of the replicated tensors instead of DP rank 0 doing all), or None for the
    default strategy."""
    if not fully_parallel or dist.get_world_size() == 1:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
        FullyParallelSaveStrategyWrapper,
    )

    group = ps.get_data_parallel_group(with_context_parallel=True)
    if action == "save":
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


def _sum_over_ranks(value: int) -> int:
    return int(collectives.all_reduce(torch.tensor([value], dtype=torch.int64)).item())


def _agree(problem: Optional[Exception], elsewhere: str) -> None:
    """Collective: raise ``problem`` here, or a pointer to the rank that had one, on every rank."""
    anywhere = collectives.any_rank(problem is not None)
    if problem is not None:
        raise problem
    if anywhere:
        raise integrity.CheckpointSaveError(elsewhere)


def prune_checkpoints(root: str, keep_last: int, keep_every: int = 0) -> list[int]:
    """Retention: delete committed checkpoints older than the newest ``keep_last`` ones, except every
    ``keep_every``-th iteration (kept for good); returns the deleted iterations."""
    latest = read_tracker(root)
    committed = [i for i in list_iterations(root) if latest is not None and i <= latest]
    doomed = committed[:-keep_last] if keep_last > 0 else []
    doomed = [i for i in doomed if not (keep_every > 0 and i % keep_every == 0)]
    for it in doomed:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
    return doomed


def _merged(state: dict) -> dict:
    merged: dict = {}
    for key in sorted(k for k in state if k.startswith("model")):
        merged.update(state[key])
    return merged


_scheduled_async_saves: list = []  # (path, bytes) of the latest background save, for error messages


def finalize_async_saves(async_queue, blocking: bool = False) -> None:
    """Commit finished background saves (all ranks must call it at the same points)."""
    if async_queue is None:
        return
    try:
        async_queue.maybe_finalize_async_calls(blocking=blocking, no_dist=False)
    except Exception as e:  # noqa: BLE001 - a failed background write: name cause and path if known
        if not _scheduled_async_saves:
            raise
        described = integrity.describe_save_error(e, *_scheduled_async_saves[-1])
        if described is e:
            raise
        raise described from e


# --------------------------------------------------------------------------------------------- load
@dataclass
class LoadResult:
    iteration: Optional[int]  # None: no committed checkpoint (``ignored`` may still list dirs)
    path: Optional[str]
    ignored: list[int]
    rng_restored: bool = False
    optimizer_restored: bool = False
    scheduler_restored: bool = False


def find_checkpoint(root: str) -> tuple[Optional[int], list[int]]:
    """(committed iteration or None, ignored uncommitted iterations) of ``root``."""
    if not root or not os.path.isdir(root):
        return None, []
    latest = read_tracker(root)
    ignored = uncommitted_iterations(root)
    if latest is None:
        complete = [i for i in ignored if integrity.is_complete(iteration_dir(root, i))]
        if complete:
            raise CheckpointError(
                f"{os.path.join(root, TRACKER)} is missing, but {root} holds complete checkpoints "
                f"(iterations {complete}); starting from scratch would save over them. Restore the "
                f"tracker to resume from the newest (`echo {complete[-1]} > {os.path.join(root, TRACKER)}`),"
                " or give this run another checkpoint.save directory"
            )
    if latest is not None and not os.path.isfile(os.path.join(iteration_dir(root, latest), "metadata.json")):
        raise CheckpointError(
            f"{root}/{TRACKER} names iteration {latest} but {iteration_dir(root, latest)} is missing "
            "or incomplete; restore it or point the tracker at an earlier complete iteration"
        )
    return latest, ignored


def resume_source(save: Optional[str], load: Optional[str]) -> tuple[Optional[str], bool]:
    """(directory to load, whether it is the run's own save directory).

    A run resumes its own ``save`` directory as soon as that holds a committed checkpoint; ``load``
    (e.g. the previous stage) is only where it starts from before that, so a requeued or resubmitted
    stage never goes back to the previous stage's checkpoint."""
    if save and find_checkpoint(save)[0] is not None:
        return save, True
    if load:
        return load, bool(save) and os.path.abspath(load) == os.path.abspath(save)
    return save, True


def load_checkpoint(
    root: str,
    model_chunks: list,
    optimizer,
    scheduler,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    load_scheduler: bool = True,
    fully_reshardable: bool = True,
    iteration: Optional[int] = None,
    verify: bool = True,
    fallback_on_corruption: bool = False,
    fully_parallel: bool = False,
    optimizer_gather: str = PER_PARAM,
) -> tuple[LoadResult, TrainState]:
    """Load the latest committed checkpoint of ``root`` into model/optimizer/scheduler.

    When ``root`` holds no committed checkpoint, the result's ``iteration`` is None (and
    ``ignored`` lists uncommitted directories) and the TrainState is fresh. A fully_reshardable
    optimizer state (written with any ``optimizer_gather``) is read per parameter in phases with
    ``per_param``, or whole on every rank (megatron's load) with the other two.
    """
    from megatron.core import dist_checkpointing

    latest, ignored = find_checkpoint(root)
    if iteration is not None:
        if not os.path.isfile(os.path.join(iteration_dir(root, iteration), "metadata.json")):
            raise CheckpointError(
                f"iteration {iteration} is not in {root} (available: {list_iterations(root)})"
            )
        latest = iteration
    if latest is None:
        return LoadResult(None, None, ignored), TrainState()
    if verify:
        latest = _verified_iteration(root, latest, fallback_on_corruption and iteration is None)
    path = iteration_dir(root, latest)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - e.g. a truncated common.pt of an unverified checkpoint
        raise CheckpointError(f"cannot read {os.path.join(path, 'common.pt')}: {e}. Restore it from a "
                              "copy or resume from an earlier iteration") from e
    saved_world = common.get("world_size")
    rank, world = dist.get_rank(), dist.get_world_size()

    state: dict[str, Any] = _model_sharded_state(model_chunks)
    saved_format = common.get("optimizer_format", "fully_reshardable")
    restore_optimizer = load_optimizer and optimizer is not None and "optimizer" in common
    per_param_plan = None
    if restore_optimizer:
        _check_gather(optimizer_gather)
        _ensure_optimizer_state(optimizer)
        model_for_optimizer = state["model"] if len(model_chunks) == 1 else _merged(state)
        metadata = _optimizer_metadata(saved_format == "fully_reshardable", optimizer_gather)
        if saved_format == "fully_reshardable" and optimizer_gather == PER_PARAM:
            per_param_plan = _per_param_load_plan(optimizer, model_for_optimizer)
            with _ParamStateOverride(optimizer, lambda sub, model_sd: {}):  # read in phases below
                state["optimizer"] = optimizer.sharded_state_dict(
                    model_for_optimizer, is_loading=True, metadata=metadata)
        else:
            state["optimizer"] = optimizer.sharded_state_dict(
                model_for_optimizer, is_loading=True, metadata=metadata)
    restore_rng = load_rng and saved_world == world
    if restore_rng:
        state["rng_state"] = _rng_sharded_object(rank, world)
    try:
        loaded = dist_checkpointing.load(state, path, _parallel_strategy("load", fully_parallel, path))
    except Exception as e:  # noqa: BLE001 - shard read errors name no file; name the checkpoint
        if not _looks_like_damage(e):
            raise
        raise CheckpointError(f"cannot read the checkpoint {path}: {e}. Its files may be damaged "
                              "(`sha256sum` them against checksums.json); restore them or resume "
                              "from an earlier iteration") from e

    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if restore_optimizer:
        loaded_optimizer = _adapt_chained(loaded["optimizer"], optimizer)
        if per_param_plan is not None:
            loaded_optimizer = _drop_param_state(loaded_optimizer)
        optimizer.load_state_dict(loaded_optimizer)
        if per_param_plan is not None:
            _load_per_param_state(per_param_plan, path,
                                  lambda: _parallel_strategy("load", fully_parallel, path))
        _unshare_step(optimizer)
    restore_scheduler = (load_scheduler and scheduler is not None
                         and loaded.get("opt_param_scheduler") is not None)
    if restore_scheduler:  # the current config's schedule at the saved step (training/schedule.py)
        resume_scheduler(scheduler, loaded["opt_param_scheduler"])
    if restore_rng:
        _restore_rng(loaded["rng_state"])
    train_state = TrainState(
        iteration=int(loaded["iteration"]),
        consumed_train_samples=int(loaded["consumed_train_samples"]),
        data_fingerprint=dict(loaded.get("data_fingerprint") or {}),
        extra=dict(loaded.get("extra") or {}),
        schedule=dict(loaded.get("schedule")
                      or definition_from_scheduler_state(loaded.get("opt_param_scheduler") or {})),
    )
    return LoadResult(latest, path, ignored, restore_rng, restore_optimizer,
                      restore_scheduler), train_state


def _looks_like_damage(exc: BaseException) -> bool:
    """A read error of damaged files (EOF, I/O, bad zip/pickle), not e.g. a model/checkpoint mismatch."""
    markers = ("EOFError", "PytorchStreamReader", "zip archive", "UnpicklingError", "Errno", "truncated",
               "unexpected EOF", "No such file")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (EOFError, OSError)) or any(m in str(exc) for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _verified_iteration(root: str, latest: int, allow_fallback: bool) -> int:
    """Collective: ``latest`` when its files match their digests; with ``allow_fallback`` the newest
    earlier complete checkpoint that verifies (the damaged directories are renamed ``*.corrupt-*``,
    never deleted, and the tracker is pointed at the one used); otherwise a CheckpointCorruptError
    naming the files and the way out."""
    candidate, damaged = latest, []
    while True:
        problems = integrity.verify_checkpoint(iteration_dir(root, candidate))
        if not problems:
            break
        damaged.append(candidate)
        earlier = [i for i in list_iterations(root)
                   if i < candidate and integrity.is_complete(iteration_dir(root, i))]
        if not allow_fallback or not earlier:
            way_out = (f"set checkpoint.fallback_on_corruption=true to resume from "
                       f"{iteration_dir(root, earlier[-1])} (the damaged directory is renamed, not "
                       "deleted), or restore the files from a copy" if earlier else
                       "restore the files from a copy (there is no earlier complete checkpoint)")
            raise integrity.CheckpointCorruptError(
                f"checkpoint {iteration_dir(root, candidate)} is damaged: " + "; ".join(problems)
                + f". Nothing was loaded. To go on, {way_out}")
        if dist.get_rank() == 0:
            print(f"[checkpoint] {iteration_dir(root, candidate)} is damaged ({'; '.join(problems)}); "
                  f"checkpoint.fallback_on_corruption: trying {iteration_dir(root, earlier[-1])}",
                  flush=True)
        candidate = earlier[-1]
    if damaged:
        if dist.get_rank() == 0:
            for it in damaged:
                kept = integrity.set_aside(iteration_dir(root, it), "corrupt")
                print(f"[checkpoint] damaged checkpoint kept as {kept}", flush=True)
            _write_tracker(root, candidate)
            print(f"[checkpoint] fell back to iteration {candidate} (tracker rewritten)", flush=True)
        dist.barrier()
    return candidate
