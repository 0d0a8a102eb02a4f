"""No restart destroys or silently loads a bad checkpoint: digests taken while writing and checked on
load (bit flips, truncation), opt-in fallback to the previous checkpoint, a missing tracker, a second
run on the same directory, disk full, permission/quota errors, retention, and a save never deleting a
committed or complete checkpoint.

The training scenarios share one pair of gloo processes (one start-up of megatron) and report what
they saw; each test below checks one case.
"""

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.harness import run_distributed
from tests.train_utils import ROOT, run_training

BASE = ["train.global_batch_size=4", "train.micro_batch_size=2", "schedule.warmup_iters=1",
        "parallel.distributed_optimizer=true"]



def _reference_digest(path: str) -> tuple:
    """(size, SHA-256) by plain hashlib: the reference the manifest is checked against."""
    import hashlib

    data = open(path, "rb").read()
    return len(data), hashlib.sha256(data).hexdigest()

def _attempt(fn, *args):
    try:
        return {"ok": fn(*args)}
    except Exception as e:  # noqa: BLE001 - the scenario reports the error text and type
        return {"error": f"{type(e).__name__}: {e}"}


def _train(ckpt, *extra):
    result = run_training(BASE + [f"checkpoint.save={ckpt}", *extra])
    return {"resumed_from": result["resumed_from"], "iteration": result["iteration"]}


def _tracker(ckpt):
    return open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip()


def _scenarios(tmp):
    import torch.distributed as dist

    from longcat_megatron.training import checkpoint_integrity as integrity

    rank = None
    seen = {}
    out = {}

    # Which files the commit had to hash itself (shards must come with the writer's digest).
    orig_manifest, orig_digest = integrity.write_manifest, integrity.file_digest
    hashed_at_commit = []
    state = {"in_commit": False}

    def manifest(path):
        state["in_commit"] = True
        try:
            return orig_manifest(path)
        finally:
            state["in_commit"] = False

    def digest(path):
        if state["in_commit"]:
            hashed_at_commit.append(os.path.basename(path))
        return orig_digest(path)

    integrity.write_manifest, integrity.file_digest = manifest, digest

    # A: async and sync saves leave a manifest whose shard digests match the files.
    a = os.path.join(tmp, "a")
    out["first"] = _attempt(_train, a, "train.train_iters=4", "checkpoint.save_interval=2",
                            "checkpoint.async_save=true")
    out["resumed"] = _attempt(_train, a, "train.train_iters=6", "checkpoint.save_interval=2")
    rank = dist.get_rank()
    if rank == 0:
        for it in (4, 6):
            path = os.path.join(a, f"iter_{it:07d}")
            files = json.load(open(os.path.join(path, integrity.MANIFEST)))["files"]
            seen[it] = {name: (rec["size"], rec["sha256"]) == _reference_digest(os.path.join(path, name))
                        for name, rec in files.items()}
            seen[f"sidecars{it}"] = [n for n in os.listdir(path) if n.endswith(integrity.SIDECAR)]
    out["digests"] = seen
    out["hashed_at_commit"] = sorted(set(hashed_at_commit))
    integrity.write_manifest, integrity.file_digest = orig_manifest, orig_digest
    dist.barrier()

    # B: 64 flipped bytes in a shard of the latest checkpoint: refused, the file named.
    shard = sorted(n for n in os.listdir(os.path.join(a, "iter_0000006")) if n.endswith(".distcp"))[0]
    if rank == 0:
        with open(os.path.join(a, "iter_0000006", shard), "r+b") as f:
            f.seek(200)
            block = f.read(64)
            f.seek(200)
            f.write(bytes(b ^ 0xFF for b in block))
    dist.barrier()
    out["flipped"] = _attempt(_train, a, "train.train_iters=8")
    out["flipped_shard"] = shard
    # C: the same with fallback allowed: resumes from iteration 4, keeps the damaged directory.
    out["fallback"] = _attempt(_train, a, "train.train_iters=8", "checkpoint.fallback_on_corruption=true")
    out["fallback_tracker"] = _tracker(a)
    out["fallback_dirs"] = sorted(os.listdir(a))
    dist.barrier()

    # D: a truncated common.pt in the latest checkpoint is named as truncated.
    if rank == 0:
        common = os.path.join(a, "iter_0000008", "common.pt")
        os.truncate(common, os.path.getsize(common) // 2)
    dist.barrier()
    out["truncated"] = _attempt(_train, a, "train.train_iters=10")
    dist.barrier()

    # E: the tracker deleted: a clear error, every checkpoint left in place.
    b = os.path.join(tmp, "b")
    _train(b, "train.train_iters=2", "checkpoint.save_interval=1")
    dist.barrier()
    if rank == 0:
        os.remove(os.path.join(b, "latest_checkpointed_iteration.txt"))
    dist.barrier()
    out["no_tracker"] = _attempt(_train, b, "train.train_iters=4")
    out["no_tracker_dirs"] = sorted(n for n in os.listdir(b) if n.startswith("iter_"))
    dist.barrier()

    # F: disk full before the save: the cause, the sizes and the path; the previous commit stays.
    c = os.path.join(tmp, "c")
    _train(c, "train.train_iters=2")
    integrity.free_bytes = lambda path: 1000
    out["disk_full"] = _attempt(_train, c, "train.train_iters=4")
    out["disk_full_tracker"] = _tracker(c)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("integrity"))
    results = run_distributed(_scenarios, 2, tmp, timeout=400)
    return results[0]


def test_digests_are_recorded_while_writing(scenarios):
    assert "ok" in scenarios["first"] and "ok" in scenarios["resumed"], scenarios
    for it in (4, 6):  # 4: async save, 6: sync save
        digests = scenarios["digests"][it]
        assert any(name.endswith(".distcp") for name in digests)
        assert all(digests.values()), digests
        assert scenarios["digests"][f"sidecars{it}"] == []
    # the commit hashed only small metadata files itself, never a shard
    assert not [n for n in scenarios["hashed_at_commit"] if n.endswith(".distcp")], scenarios
    assert "common.pt" in scenarios["hashed_at_commit"]


def test_flipped_bytes_in_a_shard_are_refused_with_the_file_named(scenarios):
    err = scenarios["flipped"].get("error", "")
    assert err.startswith("CheckpointCorruptError"), scenarios["flipped"]
    assert scenarios["flipped_shard"] in err and "does not match its SHA-256" in err
    assert "checkpoint.fallback_on_corruption=true" in err and "iter_0000004" in err


def test_fallback_on_corruption_resumes_previous_and_keeps_damaged(scenarios):
    assert scenarios["fallback"] == {"ok": {"resumed_from": 4, "iteration": 8}}, scenarios["fallback"]
    assert scenarios["fallback_tracker"] == "8"
    assert any(n.startswith("iter_0000006.corrupt-") for n in scenarios["fallback_dirs"])


def test_truncated_common_pt_is_named(scenarios):
    err = scenarios["truncated"].get("error", "")
    assert "common.pt: truncated" in err and "iter_0000008" in err, scenarios["truncated"]


def test_missing_tracker_with_complete_checkpoints_is_an_error(scenarios):
    err = scenarios["no_tracker"].get("error", "")
    assert "latest_checkpointed_iteration.txt is missing" in err and "[1, 2]" in err, err
    assert "echo 2 >" in err
    assert scenarios["no_tracker_dirs"] == ["iter_0000001", "iter_0000002"]


def test_disk_full_names_cause_sizes_and_path(scenarios):
    err = scenarios["disk_full"].get("error", "")
    assert err.startswith("CheckpointSaveError") and "no space left" in err, scenarios["disk_full"]
    assert "1,000 are free" in err and os.sep + "c" in err
    assert scenarios["disk_full_tracker"] == "2"


# ----------------------------------------------------------------------------- one-process cases
_HOLD = r"""
import sys, time
from longcat_megatron.training.checkpoint_lock import lock_save_dir
lock = lock_save_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_on_the_same_directory_stops_with_the_holder_named(tmp_path):
    from longcat_megatron.training.checkpoint_lock import CheckpointDirLocked, lock_save_dir

    env = dict(os.environ, PYTHONPATH=ROOT, SLURM_JOB_ID="4242")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirLocked) as e:
            lock_save_dir(str(tmp_path))
        msg = str(e.value)
        assert f"pid={holder.pid}" in msg and "slurm_job=4242" in msg and str(tmp_path) in msg
    finally:
        holder.kill()
        holder.wait()
    lock = lock_save_dir(str(tmp_path))  # the holder died: the lock is free again, nothing to clean
    lock.release()


def test_a_save_never_removes_committed_or_complete_checkpoints(tmp_path):
    from longcat_megatron.training import checkpoint_integrity as integrity

    committed = tmp_path / "iter_0000010"
    (committed).mkdir()
    (committed / integrity.MANIFEST).write_text("{}")
    with pytest.raises(integrity.CheckpointSaveError, match="tracker already commits iteration 10"):
        integrity.clear_for_save(str(committed), 10, committed=10)
    assert (committed / integrity.MANIFEST).exists()
    complete = tmp_path / "iter_0000020"  # committed by another run after this one's tracker read
    complete.mkdir()
    (complete / integrity.MANIFEST).write_text("{}")
    kept = integrity.clear_for_save(str(complete), 20, committed=10)
    assert kept and os.path.isfile(os.path.join(kept, integrity.MANIFEST)) and not complete.exists()
    partial = tmp_path / "iter_0000030"  # shards of a save that never committed
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x")
    assert integrity.clear_for_save(str(partial), 30, committed=10) is None
    assert not partial.exists()


def test_retention_keeps_last_and_every_nth(tmp_path):
    from longcat_megatron.training.checkpointing import _write_tracker, prune_checkpoints

    for it in range(2, 12, 2):
        (tmp_path / f"iter_{it:07d}").mkdir()
    _write_tracker(str(tmp_path), 10)
    assert prune_checkpoints(str(tmp_path), keep_last=2, keep_every=4) == [2, 6]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000008", "iter_0000010",
                                            "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EACCES, "permission denied"),
])
def test_save_errors_name_cause_and_path(tmp_path, code, words):
    from longcat_megatron.training.checkpoint_integrity import CheckpointSaveError, describe_save_error

    path = str(tmp_path / "iter_0000005")
    inner = OSError(code, os.strerror(code), path + "/__0_0.distcp")
    try:
        try:
            raise inner
        except OSError as e:  # as megatron re-raises a writer failure
            raise RuntimeError("Worker failure: enforce fail at inline_container.cc:672") from e
    except RuntimeError as outer:
        described = describe_save_error(outer, path, needed=10)
    assert isinstance(described, CheckpointSaveError)
    assert words in str(described) and path in str(described)
    unknown = RuntimeError("something else")
    assert describe_save_error(unknown, path, needed=10) is unknown
