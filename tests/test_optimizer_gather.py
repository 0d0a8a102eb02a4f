"""The fully_reshardable optimizer state saved and loaded three ways (``checkpoint.optimizer_gather``):

* ``per_param`` (ours): each parameter's fp32 copy and Adam moments are assembled on one data-parallel
  rank (pieces from the other holders over gloo) and written there; a load reads, in phases, only the
  parameters whose pieces the rank holds;
* ``all_ranks``: megatron's default (every rank all-gathers the whole state of its model-parallel
  shard at a save, and loads all of it);
* ``dp_rank_0``: megatron's ``distrib_optim_fully_reshardable_mem_efficient`` (gathered over gloo on
  data-parallel rank 0 only, which writes all of it).

One 2-process job (DP=2, distributed optimizer, bf16, ~15 DDP buckets): 4 steps straight; then for
each way of saving, 2 steps + save, and a resume to 4 loaded another way (per_param <-> all_ranks, dp_rank_0 -> per_param;
async save and fully-parallel load on one each; the per_param load in many small phases). Every resumed
run must equal the straight one bitwise (losses and weights). The optimizer-state bytes each rank
holds while saving show the difference: per_param about half the state per rank, dp_rank_0 all of it
on rank 0 and none on rank 1, all_ranks all of it on both.
"""

from __future__ import annotations

import torch

from tests.harness import run_distributed
from tests.train_utils import run_training

BASE = ["train.train_iters=4", "schedule.warmup_iters=1", "parallel.distributed_optimizer=true",
        "optimizer.bf16=true",
        # many DDP buckets, as every real run has (megatron's own gather saved them wrongly: see
        # mcore_fixes.fix_fully_reshardable_bucket_padding)
        "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=2000"]
# (saved with, loaded with, extra overrides of the first part, extra overrides of the resume)
CASES = [
    ("per_param", "all_ranks", ["checkpoint.async_save=true"], []),
    ("all_ranks", "per_param", [], ["checkpoint.fully_parallel_load=true"]),
    ("dp_rank_0", "per_param", [], []),
]


def _held_optimizer_bytes(state: dict) -> int:
    """Bytes of the optimizer-state tensors a rank holds for a save (views of one buffer counted by
    what they show: megatron's gathered buffers are exactly covered by them)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return sum(v.data.numel() * v.data.element_size() for v in nested_values(state.get("optimizer") or {})
               if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.data is not None
               and v.key.startswith("optimizer.state."))


def _job(root: str) -> dict:
    from megatron.core import dist_checkpointing

    held = []
    dcp_save = dist_checkpointing.save

    def recording_save(state, *a, **k):
        held.append(_held_optimizer_bytes(state))
        return dcp_save(state, *a, **k)

    from longcat_megatron.training import optimizer_checkpoint

    dist_checkpointing.save = recording_save
    optimizer_checkpoint.LOAD_PHASE_BYTES = 64 * 1024  # many phases (the tiny model's state is ~2.5 MB)
    try:
        out = {"straight": run_training(BASE + ["checkpoint.save=null"])}
        for saved, loaded, first_extra, second_extra in CASES:
            path = f"{root}/{saved}"
            held.clear()
            first = run_training(BASE + first_extra + [f"checkpoint.save={path}", "train.exit_interval=2",
                                                       f"checkpoint.optimizer_gather={saved}"])
            second = run_training(BASE + second_extra + [f"checkpoint.save={path}",
                                                         f"checkpoint.optimizer_gather={loaded}",
                                                         "checkpoint.save_interval=0", "train.exit_interval=4"])
            out[saved] = {"first": first, "second": second, "held": held[0]}
    finally:
        dist_checkpointing.save = dcp_save
    return out


def test_optimizer_gathers_are_interchangeable_and_bitwise(tmp_path):
    out = run_distributed(_job, 2, str(tmp_path), timeout=600)
    for rank in range(2):
        straight = out[rank]["straight"]
        for saved, loaded, _, _ in CASES:
            r = out[rank][saved]
            assert r["first"]["iteration"] == 2 and r["second"]["resumed_from"] == 2, (saved, loaded)
            if rank == 0:
                assert {**r["first"]["losses"], **r["second"]["losses"]} == straight["losses"], (saved, loaded)
            a, b = straight["weights"], r["second"]["weights"]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (saved, loaded, k)
    held = {saved: [out[rank][saved]["held"] for rank in range(2)] for saved, _, _, _ in CASES}
    whole = held["all_ranks"][0]
    assert whole > 0 and held["all_ranks"] == [whole, whole]
    assert held["dp_rank_0"] == [whole, 0]
    # per_param: each rank holds what it owns; together exactly the whole state, about half each
    assert sum(held["per_param"]) == whole
    assert all(0.25 * whole < h < 0.75 * whole for h in held["per_param"]), held
