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
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


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


# How the fully_reshardable optimizer state is brought together (checkpoint.optimizer_gather).
PER_PARAM, ALL_RANKS, DP_RANK_0 = "per_param", "all_ranks", "dp_rank_0"
OPTIMIZER_GATHERS = (PER_PARAM, ALL_RANKS, DP_RANK_0)


def _optimizer_metadata(fully_reshardable: bool, gather: str = PER_PARAM) -> dict:
    if fully_reshardable:
        md = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
        if gather == DP_RANK_0:
            md["distrib_optim_fully_reshardable_mem_efficient"] = True
        return md
    return {"distrib_optim_sharding_type": "dp_reshardable"}


# ------------------------------------------------- optimizer state: fully reshardable, per parameter
# megatron's fully_reshardable format stores, for every parameter, its fp32 main copy and Adam moments
# in the parameter's own (model-parallel shard) shape: ``optimizer.state.{param,exp_avg,exp_avg_sq}.KEY``.
# megatron builds it by gathering the whole flat state of the rank's model-parallel shard into host
# memory: on every rank (default) or on data-parallel rank 0 over gloo (``mem_efficient``), at every
# save; and every rank loads the whole of it. The distributed optimizer holds each parameter in
# pieces on the data-parallel ranks (each rank 1/DP of every bucket), so that is DP x what a rank owns.
#
# ``per_param`` writes the same tensors under the same keys (either megatron variant reads them, and
# it reads theirs) without the gather: each parameter's state is assembled on one data-parallel rank
# holding a piece of it (balanced by size; the other pieces come over the gloo group), which writes
# it; and a load reads, in phases of at most LOAD_PHASE_BYTES per rank, only the parameters whose
# pieces the rank holds, and keeps only its pieces. A rank's host memory is then about its own share
# (1/DP of the state) at a save, and one phase at a load.
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
LOAD_PHASE_BYTES = 2 * 2**30


def _distributed_subs(optimizer) -> list:
    """The megatron DistributedOptimizers (not stubs, not FSDP) among the chained optimizers."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [sub for sub in _optimizers(optimizer)
            if isinstance(sub, DistributedOptimizer) and not sub.is_stub_optimizer
            and not sub.ddp_config.use_megatron_fsdp]


@dataclass
class _Piece:
    param_idx: int  # megatron's index of the parameter in the sub-optimizer's fully_reshardable state
    gbuf_idx: int
    param: Any  # the model parameter
    numel: int
    pieces: dict  # data-parallel rank -> (start, end) of its piece in the flattened parameter
    owner: int  # the data-parallel rank that assembles and writes the parameter's state


def _layout(sub) -> list:
    """Every parameter of the sub-optimizer in megatron's fully_reshardable order, with the piece each
    data-parallel rank holds (the same on every rank of the group: it follows from the buffers) and
    its owner (a holder; pieces of one rank stay there, shared parameters go to the holder with the
    least state so far, then the biggest piece, then the lowest rank)."""
    group = sub.data_parallel_group_gloo
    dp_size, me = group.size(), group.rank()
    load = [0] * dp_size
    out, param_idx = [], 0
    for gbuf_idx, gbuf_range_maps in enumerate(sub.gbuf_ranges):
        buffer = sub.buffers[gbuf_idx]
        for range_maps in gbuf_range_maps.values():  # one dtype per buffer (megatron asserts it)
            local = {p: r["param"] for m in range_maps for p, r in m["param_map"].items()}
            for param, (start, end, bucket_id) in buffer.param_index_map.items():
                bucket = buffer.buckets[bucket_id]
                shard = bucket.grad_data.numel() // dp_size
                pieces = {}
                for r in range((start - bucket.offset) // shard, (end - 1 - bucket.offset) // shard + 1):
                    lo, hi = bucket.offset + r * shard, bucket.offset + (r + 1) * shard
                    pieces[r] = (max(start, lo) - start, min(end, hi) - start)
                mine = local.get(param)
                mine = None if mine is None else (mine.start, mine.end)
                if mine != pieces.get(me):
                    raise RuntimeError(f"checkpoint: the optimizer's shard of a parameter ({mine}) is not "
                                       f"where its buckets put it ({pieces.get(me)})")
                owner = min(pieces, key=lambda r: (load[r], -(pieces[r][1] - pieces[r][0]), r))
                load[owner] += end - start
                out.append(_Piece(param_idx, gbuf_idx, param, end - start, pieces, owner))
                param_idx += 1
    return out


def _fully_reshardable_template(sub, model_sd: dict, is_loading: bool) -> dict:
    """megatron's own ``sharded_param_state_fully_reshardable`` ({param_idx: {key: ShardedTensor or
    factory}}: keys, shapes, replica ids, factories exactly as megatron writes and reads them), built
    over meta tensors instead of the gathered state: nothing is allocated or communicated."""
    meta = {"buckets_coalesced": True}
    for gbuf_idx, gbuf_range_maps in enumerate(sub.gbuf_ranges):
        n = sub.buffers[gbuf_idx].numel_unpadded
        world = {k: torch.empty((n,), dtype=torch.float32, device="meta") for k in STATE_KEYS}
        world["numel_unpadded"] = n
        meta[gbuf_idx] = {dtype: world for dtype in gbuf_range_maps}
    sub.get_parameter_state_dp_zero = lambda **_: meta
    try:
        return type(sub).sharded_param_state_fully_reshardable(
            sub, model_sd, is_loading, {"distrib_optim_sharding_type": "fully_reshardable"})
    finally:
        del sub.get_parameter_state_dp_zero


def _local_state(sub, param) -> dict:
    tensors = sub._get_main_param_and_optimizer_states(param)
    return {k: tensors[k].detach().reshape(-1) for k in STATE_KEYS}


def _is_main(replica_id) -> bool:
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return is_main_replica(replica_id)


def _owner_replica_ids(sub, layout: list, template: dict) -> dict:
    """Collective over the data-parallel group: the replica id each owner writes its parameters'
    state with. The state is replicated wherever the model parameter is (megatron's own format:
    each copy carries the parameter's replica id); a group of data-parallel ranks holds one copy in
    pieces. The owner's copy is the main one when its group holds the parameter's main model
    replica (not necessarily on the owner), else a copy that is not written (e.g. an expert weight
    at expert tensor size 1 under TP 2 without a separate expert optimizer: replicated over TP,
    its state sharded over a data-parallel group per TP rank)."""
    some = lambda idx: next(iter(template[idx].values()))  # noqa: E731 - all keys share the id
    mine = torch.tensor([int(_is_main(some(e.param_idx).replica_id)) for e in layout] or [0],
                        dtype=torch.int32)
    collectives.all_reduce(mine, op=dist.ReduceOp.MAX, group=sub.data_parallel_group_gloo)
    out = {}
    for i, e in enumerate(layout):
        rid = some(e.param_idx).replica_id
        if mine[i]:
            out[e.param_idx] = 0 if isinstance(rid, int) else tuple(0 for _ in rid)
        else:
            out[e.param_idx] = rid  # not main on any rank of this group: neither is the owner's
    return out


def _per_param_save_state(sub, model_sd: dict) -> dict:
    """Collective over the sub-optimizer's data-parallel group: the fully_reshardable param state of
    the parameters this rank owns, assembled from the pieces of their holders."""
    from dataclasses import replace

    group = sub.data_parallel_group_gloo
    me, ranks = group.rank(), dist.get_process_group_ranks(group)
    layout = _layout(sub)
    template = _fully_reshardable_template(sub, model_sd, is_loading=False)
    replica_ids = _owner_replica_ids(sub, layout, template)
    sends: dict[int, list] = {}
    recvs: dict[int, list] = {}
    for e in layout:
        if e.owner != me and me in e.pieces:
            sends.setdefault(e.owner, []).append(e)
        if e.owner == me:
            for r in e.pieces:
                if r != me:
                    recvs.setdefault(r, []).append(e)

    def length(entries, rank):
        return sum(3 * (e.pieces[rank][1] - e.pieces[rank][0]) for e in entries)

    works, inbox = [], {}
    for src, entries in recvs.items():
        inbox[src] = torch.empty((length(entries, src),), dtype=torch.float32)
        works.append(dist.irecv(inbox[src], src=ranks[src], group=group))
    outbox = []
    for dst, entries in sends.items():
        buf = torch.cat([_local_state(sub, e.param)[k].float().cpu() for e in entries for k in STATE_KEYS])
        outbox.append(buf)
        works.append(dist.isend(buf, dst=ranks[dst], group=group))
    for w in works:
        w.wait()
    del outbox
    full = {}
    for e in layout:
        if e.owner == me:
            full[e.param_idx] = {k: torch.empty((e.numel,), dtype=torch.float32) for k in STATE_KEYS}
            start, end = e.pieces[me]
            for k, t in _local_state(sub, e.param).items():
                full[e.param_idx][k][start:end].copy_(t)
    for src, entries in recvs.items():
        offset = 0
        for e in entries:
            start, end = e.pieces[src]
            for k in STATE_KEYS:
                full[e.param_idx][k][start:end].copy_(inbox[src][offset:offset + end - start])
                offset += end - start
    out = {}
    for idx, tensors in full.items():
        out[idx] = {}
        for k, sh in template[idx].items():
            out[idx][k] = replace(sh, data=tensors[k].view(sh.data.shape), replica_id=replica_ids[idx])
    return out


class _ParamStateOverride:
    """While megatron's ``optimizer.sharded_state_dict`` runs (which builds the common part, the
    chaining and everything else), each DistributedOptimizer's fully_reshardable param state is
    ``build(sub)`` instead of megatron's gathered one."""

    def __init__(self, optimizer, build: Callable):
        self.subs, self.build = _distributed_subs(optimizer), build

    def __enter__(self):
        for sub in self.subs:
            sub.sharded_param_state_fully_reshardable = (
                lambda model_sd, is_loading=False, metadata=None, _sub=sub: self.build(_sub, model_sd))
        return self

    def __exit__(self, *exc):
        for sub in self.subs:
            del sub.sharded_param_state_fully_reshardable


def _load_phases(sub, budget: int) -> list[list]:
    """The parameters this rank holds pieces of, in phases (the same boundaries on every rank of the
    data-parallel group, so that the holders of a parameter read it in the same phase and megatron's
    fully-parallel load can share the read): a phase ends before any holder would exceed ``budget``
    bytes of whole-parameter state."""
    me = sub.data_parallel_group_gloo.rank()
    phases, current, used = [], [], {}
    for e in _layout(sub):
        size = len(STATE_KEYS) * 4 * e.numel
        if any(used.get(r, 0) + size > budget for r in e.pieces) and used:
            phases.append(current)
            current, used = [], {}
        for r in e.pieces:
            used[r] = used.get(r, 0) + size
        if me in e.pieces:
            current.append(e)
    phases.append(current)
    return phases


def _per_param_load_plan(optimizer, model_sd: dict, budget: Optional[int] = None) -> list:
    """What :func:`_load_per_param_state` reads: per DistributedOptimizer, megatron's template (meta
    tensors) and this rank's phases. Built before the model is loaded (loading expands the model's
    sharded-tensor factories in place)."""
    budget = LOAD_PHASE_BYTES if budget is None else budget
    return [(sub, _fully_reshardable_template(sub, model_sd, is_loading=True), _load_phases(sub, budget))
            for sub in _distributed_subs(optimizer)]


def _load_per_param_state(plan: list, path: str, strategy_factory: Callable) -> None:
    """Collective (every rank): restore the fully_reshardable param state of every DistributedOptimizer
    of ``plan`` from ``path``, reading phase by phase only the parameters whose pieces this rank
    holds and keeping only its pieces."""
    from dataclasses import replace

    from megatron.core import dist_checkpointing

    count = max((len(phases) for _, _, phases in plan), default=0)
    count = int(collectives.all_reduce(torch.tensor([count]), op=dist.ReduceOp.MAX).item())
    for phase in range(count):
        todo = [(sub, template, phases[phase] if phase < len(phases) else [])
                for sub, template, phases in plan]
        request = {i: {e.param_idx: {k: replace(sh, data=torch.empty(sh.data.shape, dtype=torch.float32))
                                     for k, sh in template[e.param_idx].items()}
                       for e in entries}
                   for i, (_, template, entries) in enumerate(todo)}
        loaded = dist_checkpointing.load(request, path, strategy_factory(), validate_access_integrity=False)
        for i, (sub, _, entries) in enumerate(todo):
            me = sub.data_parallel_group_gloo.rank()
            for e in entries:
                start, end = e.pieces[me]
                tensors = loaded[i][e.param_idx]
                sub._set_main_param_and_optimizer_states(
                    e.param, {k: tensors[k].reshape(-1)[start:end] for k in STATE_KEYS})
        del loaded, request


def _drop_param_state(loaded_optimizer: dict) -> dict:
    """The loaded optimizer dict without the (empty) param state that the per-param load restores."""
    if any(isinstance(k, int) for k in loaded_optimizer):
        return {k: ({kk: vv for kk, vv in v.items() if kk != "param_state"} if isinstance(k, int) else v)
                for k, v in loaded_optimizer.items()}
    return {k: v for k, v in loaded_optimizer.items() if k != "param_state"}


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
