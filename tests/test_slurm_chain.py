"""A whole recipe on the local SLURM cluster: `launch/recipe.sh` submits pretrain -> midtrain -> SFT as
dependent jobs (afterok), tiny config in CPU mode (2 gloo ranks under torchrun per job).

* pretraining runs 20 iterations (a crash and its requeue: tests/test_slurm_launch.py's SIGKILL test);
* mid-training (FRESH_OPTIMIZER=0: Adam state kept) starts from pretraining's final checkpoint with
  its own iteration counter (1..10) and its own LR schedule, is preempted once (SIGUSR1 after its
  iteration 4: save, exit 75, requeue) and resumes its OWN checkpoint, not pretraining's;
* SFT (FRESH_OPTIMIZER=1) starts from mid-training's final weights with fresh Adam state.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time

from tests.slurm.cluster import ROOT, job_fields, slurm_cluster  # noqa: F401 (fixture)


def _tracker(ckpt) -> int | None:
    try:
        return int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip())
    except (OSError, ValueError):
        return None


def _adam_steps(iter_dir) -> set:
    from megatron.core import dist_checkpointing

    groups = dist_checkpointing.load_common_state_dict(str(iter_dir))["optimizer"]["optimizer"]["param_groups"]
    return {float(g["step"]) for g in groups}


def _wait_done(job: str, env: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job, env)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job} not finished after {timeout}s: {job_fields(job, env)}")


def _log(run, stage: str, job: str) -> str:
    path = run / "logs" / f"{stage}-{job}.log"
    return path.read_text() if path.is_file() else ""


def test_recipe_chains_stages_through_a_preemption(slurm_cluster, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    env = dict(slurm_cluster, LONGCAT_CPU="1", CONFIG="configs/tiny.yaml", SEQ_LENGTH="64", GLOBAL_BATCH="8",
               MICRO_BATCH="2", WARMUP_ITERS="2", SAVE_INTERVAL="5", OMP_NUM_THREADS="1", CP="1",
               LONGCAT_SKIP_PREFLIGHT="1", SBATCH_ARGS="--nodes=1 --time=30")
    env.pop("TRAIN_ITERS", None)
    once = tmp_path / "faults"
    once.mkdir()
    stages = [
        "pretrain", "launch/pretrain.sh", "TRAIN_ITERS=20", "LR=1e-3", "MIN_LR=1e-4", "WSD_DECAY_FRACTION=0.25",
        "--", "midtrain", "launch/midtrain.sh", "TRAIN_ITERS=10", "LR=5e-3", "MIN_LR=5e-4",
        "WSD_DECAY_FRACTION=0.2", "FRESH_OPTIMIZER=0", "YARN_FACTOR=4", "YARN_ORIGINAL_MAX=64",
        "LONGCAT_FAULT_INJECT=signal_after_step:4", f"LONGCAT_FAULT_ONCE={once / 'signal'}",
        "--", "sft", "launch/sft.sh", "TRAIN_ITERS=4", "LR=1e-4", "MIN_LR=1e-5", "WARMUP_ITERS=1",
        "data.sft=false",  # mock data (packed SFT data: tests/test_slurm_launch.py)
    ]
    out = subprocess.run(["bash", "launch/recipe.sh", str(run), *stages], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jobs = dict(line.split() for line in out.stdout.splitlines())
    assert list(jobs) == ["pretrain", "midtrain", "sft"]
    assert job_fields(jobs["midtrain"], slurm_cluster).get("Dependency", "").startswith(f"afterok:{jobs['pretrain']}")

    fields = {s: _wait_done(jobs[s], slurm_cluster, 400) for s in jobs}
    logs = {s: _log(run, s, jobs[s]) for s in jobs}
    for s in jobs:
        assert fields[s]["JobState"] == "COMPLETED", f"{s}: {fields[s]}\n{logs[s][-3000:]}"

    pre, mid, sft = run / "pretrain", run / "midtrain", run / "sft"
    assert fields["pretrain"]["Restarts"] == "0" and _tracker(pre) == 20

    # mid-training: own counter and schedule from pretraining's final checkpoint, Adam state kept
    log = logs["midtrain"]
    first, _, second = log.partition(f"job {jobs['midtrain']} (run-midtrain) restart 1:")
    assert fields["midtrain"]["Restarts"] == "1", log[-3000:]
    assert f"starting a new stage from the weights and optimizer state of {pre}/iter_0000020" in first
    lrs = {int(m[0]): float(m[1]) for m in re.findall(r"^iter\s+(\d+)/10 \| loss \S+ \| lr (\S+)", log, re.M)}
    assert sorted(lrs) == list(range(1, 11)), log[-3000:]
    assert math.isclose(lrs[2], 5e-3, rel_tol=1e-3)  # warmup 2 -> the stage's own peak LR
    assert math.isclose(lrs[10], 5e-4, rel_tol=1e-3)  # WSD decay to the stage's own min LR
    # rank 0 logs; the injected signal reaches every rank, rank 0 may learn of it from another rank first
    assert re.search(r"\[stop\] (SIGUSR1|signal on another rank) received: saving and exiting for requeue", first)
    assert f"resumed from {mid}/iter_0000004 at iteration 4" in second
    assert "starting a new stage" not in second  # the requeued stage never goes back to pretraining
    assert _tracker(mid) == 10 and _adam_steps(mid / "iter_0000010") == {30.0}

    # SFT: from mid-training's final weights, fresh Adam state
    log = logs["sft"]
    assert f"starting a new stage from the weights of {mid}/iter_0000010" in log
    assert _tracker(sft) == 4 and _adam_steps(sft / "iter_0000004") == {4.0}
    # the exit-duration clock starts at SLURM's StartTime of the run, not when the trainer came up
    assert f"this run started {fields['sft']['StartTime']}" in log
    assert "train.exit_duration_mins=15" in log  # --time=30 minus STOP_MARGIN_MINS=15
    # each stage started only after the previous one had completed
    assert fields["pretrain"]["EndTime"] <= fields["midtrain"]["StartTime"]
    assert fields["midtrain"]["EndTime"] <= fields["sft"]["StartTime"]
