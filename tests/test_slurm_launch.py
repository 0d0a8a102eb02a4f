"""The sbatch launch scripts on a real SLURM cluster (slurmctld + slurmd + munge on localhost).

Every job is the real ``launch/*.sh`` with the tiny config in CPU mode (LONGCAT_CPU=1: gloo, 2
processes per node under one torchrun per node) and recipe variables scaled down:
* a pretraining job runs to completion, its iteration count derived from the token budget;
* ``scancel --signal=USR1`` mid-run (to the job steps, or to the batch shell as the script's
  ``--signal=B:USR1@600`` does): the job saves, requeues itself, resumes (restart 1) and ends with
  checkpoint tensors (model and optimizer) bitwise equal to the uninterrupted job's;
* SIGKILL of one rank (a crash): the job requeues itself (MAX_CRASH_REQUEUES), leaves no process of
  the crashed run behind, resumes from the last committed checkpoint and again ends bitwise equal;
* midtrain.sh starts from the pretraining checkpoint (weights only), sft.sh from midtrain's, on packed
  SFT data with loss masks.
Without root/apt the SLURM tests skip (LONGCAT_REQUIRE_SLURM=1 makes that a failure). The dry-run
tests need no SLURM.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.slurm.cluster import ROOT, Job, slurm_cluster  # noqa: F401 (fixture)

ITERS = 40
SEQ, GBS = 64, 8
SBATCH = ["--nodes=1", "--time=30"]  # the script's own --signal=B:USR1@600 header stays in force


def stage_env(base: dict, ckpt, **recipe) -> dict:
    """Environment of a tiny CPU job: the stage's recipe variables scaled down."""
    env = dict(base, LONGCAT_CPU="1", CONFIG="configs/tiny.yaml", CKPT_DIR=str(ckpt), SEQ_LENGTH=str(SEQ),
               GLOBAL_BATCH=str(GBS), MICRO_BATCH="2", TOKEN_BUDGET=str(SEQ * GBS * ITERS), WARMUP_ITERS="2",
               WSD_DECAY_FRACTION="0.25", LR="1e-3", MIN_LR="1e-4", SAVE_INTERVAL="5",
               OMP_NUM_THREADS="1")
    env.pop("TRAIN_ITERS", None)
    env.update({k: str(v) for k, v in recipe.items()})
    return env


def tracker(ckpt) -> int | None:
    path = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def checkpoint_tensors(iter_dir) -> dict:
    """All tensors (model and optimizer) of a torch_dist checkpoint, read in this one process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(iter_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state


def assert_bitwise_equal(a_dir, b_dir):
    a, b = checkpoint_tensors(a_dir), checkpoint_tensors(b_dir)
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.") for k in a) and any(not k.startswith("optimizer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between {a_dir} and {b_dir}"


@pytest.fixture(scope="module")
def straight(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The uninterrupted reference job."""
    d = tmp_path_factory.mktemp("straight")
    t0 = time.monotonic()
    job = Job("launch/pretrain.sh", stage_env(slurm_cluster, d / "ckpt"), str(d / "job.log"),
              args=["logging.log_interval=1"], sbatch_args=SBATCH)
    fields = job.finish()
    print(f"straight pretraining job took {time.monotonic() - t0:.1f}s")
    return job, fields, d / "ckpt"


def test_pretrain_job_runs_to_completion(straight):
    job, fields, ckpt = straight
    log = job.text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert fields["Restarts"] == "0"
    assert "world=2 = TP1 x CP1 x PP1 x DP2" in log  # 2 tasks: 2 ranks under torchrun
    # iterations derived from the token budget and the global batch; WSD decay = 25% of them
    assert f"train.train_iters={math.ceil(SEQ * GBS * ITERS / (GBS * SEQ))}" in log
    assert f"schedule.wsd_decay_iters={ITERS // 4}" in log and "schedule.style=wsd" in log
    # the exit-duration limit is derived from the 30-minute limit minus the 15-minute margin
    assert "train.exit_duration_mins=" in log
    assert re.search(rf"^iter\s+{ITERS}/{ITERS} \| loss", log, re.M)
    assert "training finished" in log
    assert tracker(ckpt) == ITERS


@pytest.mark.parametrize("target", ["steps", "batch"])
def test_usr1_saves_requeues_and_resumes_bitwise(target, straight, slurm_cluster, tmp_path):  # noqa: F811
    """``steps``: `scancel --signal=USR1` reaches every process of the job step (torchrun, ranks);
    ``batch``: only the batch shell gets it, as with the script's `--signal=B:USR1@600` warning, and
    its trap passes it on."""
    ckpt = tmp_path / "ckpt"
    job = Job("launch/pretrain.sh", stage_env(slurm_cluster, ckpt), str(tmp_path / "job.log"),
              args=["logging.log_interval=1"], sbatch_args=SBATCH)
    job.wait_log(r"^iter\s+1/", timeout=300)
    scancel = ["scancel", "--signal=USR1"] + (["--batch"] if target == "batch" else [])
    subprocess.run(scancel + [job.id], env=slurm_cluster, check=True)
    fields = job.finish()
    log = job.text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    # the requeued run logs SLURM_RESTART_COUNT=1 in its first line
    first_run, _, second_run = log.partition(f"job {job.id} (longcat-pretrain) restart 1:")
    assert second_run, log[-3000:]
    assert "[stop] SIGUSR1 received: saving and exiting for requeue" in first_run
    resumed = re.search(r"resumed from (\S+)/iter_(\d{7}) at iteration (\d+)", second_run)
    assert resumed and resumed.group(1) == str(ckpt), second_run[:3000]
    stopped_at = int(resumed.group(3))
    assert 1 <= stopped_at < ITERS and f"[done] iteration {stopped_at}:" in first_run
    assert "stopped early (exit 75)" in log and f"requeueing job {job.id}" in log
    assert ("batch shell received SIGUSR1" in log) == (target == "batch")
    assert tracker(ckpt) == ITERS
    assert_bitwise_equal(straight[2] / f"iter_{ITERS:07d}", ckpt / f"iter_{ITERS:07d}")


def test_sigkill_of_a_rank_is_requeued_and_resumes(straight, slurm_cluster, tmp_path):  # noqa: F811
    """A crash (SIGKILL of one rank) requeues the job (launch/common.sh, MAX_CRASH_REQUEUES) with the
    reason logged; the restart resumes from the last committed checkpoint and ends bitwise equal."""
    ckpt = tmp_path / "ckpt"
    env = stage_env(slurm_cluster, ckpt)
    job = Job("launch/pretrain.sh", env, str(tmp_path / "job1.log"), sbatch_args=SBATCH)
    deadline = time.monotonic() + 300
    while (tracker(ckpt) or 0) < 5:
        assert time.monotonic() < deadline and job.fields().get("JobState") in ("PENDING", "RUNNING"), \
            job.text()[-3000:]
        time.sleep(0.05)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    job.wait_log(r"requeueing job", timeout=300)
    committed = tracker(ckpt)
    assert committed is not None and 5 <= committed < ITERS, f"the kill came too late: {committed}"
    fields = job.finish()
    log = job.text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    # the reason: the surviving rank's error (the killed rank leaves no record) or the exit codes
    assert re.search(r"training crashed \(exit 1\): (iteration \d+: \w+|exit 1 \(rank exits)", log), log[-3000:]
    assert "requeueing after failure 1 of at most 3 (MAX_CRASH_REQUEUES)" in log
    assert f"resumed from {ckpt}/iter_{committed:07d} at iteration {committed}" in log
    # nothing of the crashed run lingers (the killed rank's spawned helpers are ended by rank.sh)
    assert job.live_processes() == []
    assert_bitwise_equal(straight[2] / f"iter_{ITERS:07d}", ckpt / f"iter_{ITERS:07d}")


def _write_chats(path: str, n: int) -> None:
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away from home".split()
    with open(path, "w") as f:
        for _ in range(n):
            msgs = []
            for _ in range(rng.randint(1, 2)):
                msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 5)))})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 6)))})
            f.write(json.dumps({"messages": msgs}) + "\n")


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    """Packed SFT data (ids + loss mask) at seq 128 from a tiny tokenizer (vocab 512 < model's 1024)."""
    from data_tools.sft import preprocess_sft
    from data_tools.tiny_corpus import build_tiny_corpus

    d = tmp_path_factory.mktemp("sftdata")
    build_tiny_corpus(str(d / "tiny"), vocab_size=512, max_mb=0.25)
    _write_chats(str(d / "chats.jsonl"), 300)
    preprocess_sft([str(d / "chats.jsonl")], str(d / "tiny" / "tokenizer"), str(d / "sft"), seq_length=128)
    return str(d / "sft")


def test_midtrain_then_sft_start_from_the_previous_stage(straight, slurm_cluster, sft_prefix,  # noqa: F811
                                                         tmp_path):
    pre_ckpt = straight[2]
    mid_ckpt, sft_ckpt = tmp_path / "mid", tmp_path / "sft"
    # midtrain: longer sequences (128 vs 64) with YaRN parameters, own budget -> 6 iterations
    mid = Job("launch/midtrain.sh",
              stage_env(slurm_cluster, mid_ckpt, INIT_FROM=pre_ckpt, SEQ_LENGTH=128, TOKEN_BUDGET=128 * GBS * 6,
                        YARN_FACTOR=4, YARN_ORIGINAL_MAX=64, CP=1, WARMUP_ITERS=1),
              str(tmp_path / "mid.log"), sbatch_args=SBATCH)
    fields = mid.finish()
    log = mid.text()
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert "model.rope_type=yarn model.yarn_factor=4" in log and "model.max_position_embeddings=256" in log
    assert f"starting a new stage from the weights of {pre_ckpt}/iter_{ITERS:07d}" in log
    assert re.search(r"^iter\s+1/6 \|", log, re.M) and tracker(mid_ckpt) == 6
    # launches are recorded where `python -m longcat_megatron.status CKPT_DIR` reads them
    assert "start" in (mid_ckpt / "logs" / "events.log").read_text()
    # sft: packed chat data with loss masks, from midtrain's checkpoint
    sft = Job("launch/sft.sh",
              stage_env(slurm_cluster, sft_ckpt, INIT_FROM=mid_ckpt, SEQ_LENGTH=128, TRAIN_ITERS=4, CP=1,
                        SFT_DATA_PATHS=f"[{sft_prefix}]", WARMUP_ITERS=1),
              str(tmp_path / "sft.log"), sbatch_args=SBATCH)
    fields = sft.finish()
    log = sft.text()
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert "data.sft=true" in log and f"data: ['{sft_prefix}']" in log
    assert "data.reset_attention_mask=true" in log          # conversations kept apart
    assert f"starting a new stage from the weights of {mid_ckpt}/iter_0000006" in log
    assert tracker(sft_ckpt) == 4
    # once a stage has its own checkpoint, a requeue/resubmission resumes it, not the previous stage
    assert _init_overrides(sft_ckpt, mid_ckpt) == []
    assert _init_overrides(tmp_path / "empty", mid_ckpt) == [f"checkpoint.load={mid_ckpt}",
                                                             "checkpoint.finetune=true"]


def _init_overrides(own, previous) -> list:
    out = subprocess.run(["bash", "-c", 'source launch/common.sh && lc_init_from "$1" "$2" 1', "-",
                          str(own), str(previous)], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


# ------------------------------------------------------------------------- dry runs (no SLURM needed)
def _dry_run(script: str, *args: str, **env) -> str:
    out = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_pretrain_recipe_dry_run_derives_iterations_from_the_token_budget():
    out = _dry_run("launch/pretrain.sh", "data.mock=true", NNODES="32", NPROC_PER_NODE="8", LONGCAT_CPU="")
    # Lite: 11T tokens, batch 1024 until 420B tokens, then 2048 (configs/stages/lite_pretrain.yaml)
    first = math.ceil(420e9 / (1024 * 8192))
    iters = first + math.ceil((11e12 - first * 1024 * 8192) / (2048 * 8192))
    assert "plan for 256 processes" in out
    assert f"tokens/step {1024 * 8192:,}; {iters:,} iterations" in out
    assert "batch schedule: 1024, then 2048 from 420B tokens" in out and "iterations = 11,000." in out
    assert "config OK" in out


def test_midtrain_recipe_dry_run_has_128k_yarn():
    # The recipe's CP=8 default plans: the LongCat MLA gathers its compressed keys over CP.
    out = _dry_run("launch/midtrain.sh", "data.mock=true", NNODES="32", NPROC_PER_NODE="8", LONGCAT_CPU="",
                   STAGE="128k")
    assert "plan for 256 processes" in out
    assert "CP8" in out and "(seq 131072)" in out
    assert f"{math.ceil(0.3e12 / (64 * 131072)):,} iterations" in out  # the 128k share of Lite's 1.5T (a guess)
    assert "config OK" in out


def test_bad_config_is_exit_2_before_any_rank_starts():
    out = subprocess.run(["bash", "launch/local.sh", "2", "configs/tiny.yaml", "parallel.tensor=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "parallel.tensor=3 does not divide model.num_attention_heads" in out.stderr
    assert "nothing was started" in out.stderr
