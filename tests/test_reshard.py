"""Resharding on resume and async checkpoint saving.

A run saves at iteration 5 under one parallel layout; another run resumes that checkpoint (weights,
optimizer in megatron's fully_reshardable format, schedule, data position) under a different layout
and trains to 10. Its losses at iterations 6..10, the resume step first, must match the uninterrupted
run under the saving layout within a relative 1e-5 (different layouts reduce in a different order, so
not bitwise). Layouts: TP 1 -> 2, PP 1 -> 2 (dense tiny GPT) and EP 2 -> 1 (tiny MoE, 4 experts top-2).

Async saving (checkpoint.async_save=true): a background save is committed under its own iteration; a
crash after the shards are written but before the save is finalized leaves the tracker at the previous
checkpoint (the directory is ignored on resume), and the resumed run is bitwise identical to an
uninterrupted synchronous run.
"""

import pytest
import torch

from tests.harness import DistributedTestError, run_distributed
from tests.train_utils import run_training

STEPS = ["train.train_iters=10", "schedule.warmup_iters=3"]
MOE = ["model.num_experts=4", "model.moe_router_topk=2"]
RTOL = 1e-5


def _assert_close_from_resume(resumed: dict, straight: dict):
    assert sorted(resumed) == list(range(6, 11)), sorted(resumed)
    for it in resumed:  # iteration 6 is the first step after the resume
        assert abs(resumed[it] - straight[it]) <= RTOL * abs(straight[it]), (it, resumed[it], straight[it])


def _saved_at_5(tmp_path_factory, name: str, world: int, overrides: list) -> str:
    ckpt = str(tmp_path_factory.mktemp(name) / "ckpt")
    first = run_distributed(run_training, world, STEPS + overrides + [f"checkpoint.save={ckpt}",
                                                                      "train.exit_interval=5"])
    assert first[0]["iteration"] == 5
    return ckpt


def _resume(world: int, overrides: list, load: str, tmp_path) -> list:
    """Resume ``load`` under ``overrides``; saves into a fresh directory so ``load`` stays at 5."""
    results = run_distributed(run_training, world, STEPS + overrides + [f"checkpoint.load={load}",
                                                                        f"checkpoint.save={tmp_path / 'out'}"])
    assert all(r["resumed_from"] == 5 for r in results)
    return results


@pytest.fixture(scope="module")
def dense():
    """Uninterrupted dense run on 1 process (TP1 PP1 DP1)."""
    return run_distributed(run_training, 1, STEPS + ["checkpoint.save=null"])[0]["losses"]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return _saved_at_5(tmp_path_factory, "dense", 1, [])


def test_resume_tp1_checkpoint_at_tp2(dense, dense_ckpt, tmp_path):
    out = _resume(2, ["parallel.tensor=2"], dense_ckpt, tmp_path)
    _assert_close_from_resume(out[0]["losses"], dense)


def test_resume_pp1_checkpoint_at_pp2(dense, dense_ckpt, tmp_path):
    out = _resume(2, ["parallel.pipeline=2"], dense_ckpt, tmp_path)
    _assert_close_from_resume(out[1]["losses"], dense)  # the last stage reports the loss


def test_resume_ep2_checkpoint_at_ep1(tmp_path_factory, tmp_path):
    ep2 = MOE + ["parallel.expert=2"]
    straight = run_distributed(run_training, 2, STEPS + ep2 + ["checkpoint.save=null"])[0]["losses"]
    ckpt = _saved_at_5(tmp_path_factory, "moe", 2, ep2)
    out = _resume(2, MOE + ["parallel.expert=1"], ckpt, tmp_path)
    _assert_close_from_resume(out[0]["losses"], straight)


# ------------------------------------------------------------------------------------------ async save
ASYNC = ["checkpoint.async_save=true", "parallel.distributed_optimizer=true"]


def test_async_save_commits_after_shards_and_resumes_exactly(tmp_path):
    ckpt = tmp_path / "async"
    args = STEPS + ASYNC + ["checkpoint.save_interval=5", f"checkpoint.save={ckpt}"]
    # 1. the background save of iteration 5 is committed (as 5, although training moved on meanwhile);
    #    the run is killed while finalizing the save of 10: shards on disk, tracker still at 5
    with pytest.raises(DistributedTestError):
        run_distributed(run_training, 2, args, env={"LONGCAT_FAULT_INJECT": "kill_during_save:10"}, timeout=180)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (ckpt / "iter_0000010" / "metadata.json").is_file()
    # 2. resuming ignores the uncommitted 10, continues from 5 and commits 10
    resumed = run_distributed(run_training, 2, args)
    assert resumed[0]["resumed_from"] == 5 and resumed[0]["ignored"] == [10]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    # 3. == an uninterrupted synchronous run, bitwise
    sync = run_distributed(run_training, 2, STEPS + ["parallel.distributed_optimizer=true",
                                                     f"checkpoint.save={tmp_path / 'sync'}"])
    assert resumed[0]["losses"] == {it: sync[0]["losses"][it] for it in range(6, 11)}
    for rank in range(2):
        a, b = sync[rank]["weights"], resumed[rank]["weights"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
