"""Resume is exact: 20 steps straight == 10 steps, stop, resume, 10 more (identical losses and
bitwise-identical final weights on CPU), at DP=2 with the distributed optimizer and megatron's
fully-parallel save and load; a crash while
writing a checkpoint resumes from the previous complete one and reports the ignored directory."""

import os

import torch

from tests.harness import DistributedTestError, run_distributed
from tests.train_utils import run_training

BASE = ["train.train_iters=20", "schedule.warmup_iters=3", "parallel.distributed_optimizer=true"]


def test_resume_is_bitwise_exact(tmp_path):
    straight = run_distributed(run_training, 2, BASE + [f"checkpoint.save={tmp_path / 'a'}"])
    ckpt = tmp_path / "b"
    first = run_distributed(run_training, 2, BASE + [f"checkpoint.save={ckpt}", "train.exit_interval=10"])
    assert first[0]["iteration"] == 10
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (ckpt / "iter_0000010" / "run_config.yaml").is_file()
    # saved with megatron's fully-parallel save (the default), loaded with its fully-parallel load
    second = run_distributed(run_training, 2, BASE + [f"checkpoint.save={ckpt}",
                                                      "checkpoint.fully_parallel_load=true"])
    assert second[0]["resumed_from"] == 10
    resumed_losses = {**first[0]["losses"], **second[0]["losses"]}
    assert resumed_losses == straight[0]["losses"]  # exact float equality
    for rank in range(2):
        a, b = straight[rank]["weights"], second[rank]["weights"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "c"
    args = BASE + ["train.train_iters=9", "checkpoint.save_interval=3", f"checkpoint.save={ckpt}"]
    try:
        run_distributed(run_training, 2, args, env={"LONGCAT_FAULT_INJECT": "kill_during_save:6"},
                        timeout=120)
        raise AssertionError("the injected SIGKILL did not happen")
    except DistributedTestError as e:
        assert "exited without reporting" in str(e) or "failed" in str(e)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert os.path.isdir(ckpt / "iter_0000006")  # shards written, never committed
    again = run_distributed(run_training, 2, args)
    assert again[0]["resumed_from"] == 3
    assert again[0]["ignored"] == [6]
    assert again[0]["iteration"] == 9
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "9"


def test_preemption_signal_saves_exits_75_and_resume_matches(tmp_path):
    """SIGUSR1 on one rank (SLURM's pre-timeout warning): all ranks agree, save the same iteration,
    exit with the requeue code; the resumed run ends exactly like an uninterrupted one."""
    straight = run_distributed(run_training, 2, BASE + ["train.train_iters=8"])
    ckpt = tmp_path / "p"
    args = BASE + ["train.train_iters=8", f"checkpoint.save={ckpt}"]
    stopped = run_distributed(run_training, 2, args, env={"LONGCAT_FAULT_INJECT": "signal_after_step:3:1"})
    assert [r["exit_code"] for r in stopped] == [75, 75]
    assert stopped[0]["iteration"] == 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    resumed = run_distributed(run_training, 2, args)
    assert resumed[0]["resumed_from"] == 3 and resumed[0]["exit_code"] == 0
    assert {**stopped[0]["losses"], **resumed[0]["losses"]} == straight[0]["losses"]
    for k, v in straight[1]["weights"].items():
        assert torch.equal(v, resumed[1]["weights"][k]), k
