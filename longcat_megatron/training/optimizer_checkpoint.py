"""The distributed optimizer's state in megatron's ``fully_reshardable`` checkpoint format, and how
it is brought together (``checkpoint.optimizer_gather``): megatron's own gathers (``all_ranks``,
``dp_rank_0``) or ``per_param`` (the same files, assembled parameter by parameter on one
data-parallel rank each, read back in bounded phases). Used by :mod:`longcat_megatron.training
.checkpointing`; the host memory each variant needs is planned in :mod:`longcat_megatron.memory_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from longcat_megatron import collectives


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


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
