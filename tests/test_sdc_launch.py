"""The launcher's handling of exit 78 (silent data corruption detected; launch/common.sh).

Every rank exits 78 after appending ``ITERATION<TAB>RANK<TAB>HOSTNAME<TAB>DESCRIPTION`` per suspect
rank to ``$LONGCAT_SDC_FILE``. The launcher
* without SLURM: logs the suspects and returns 78 (no rerun on the same GPU);
* under SLURM: requeues the job excluding the suspect host(s) (requeuehold, ExcNodeList, release), at
  most MAX_SDC_REQUEUES times per job (history CKPT_DIR/.longcat-sdc-requeues).
The SLURM tests run on the one-node local cluster (tests/slurm): excluding its only node leaves the
requeued job PENDING (BadConstraints), which is what the test checks before cancelling it: the real
launch/pretrain.sh with a bit flip injected on rank 1 at iteration 3 (found by the replay check).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from tests.slurm.cluster import ROOT, Job, slurm_cluster  # noqa: F401 (fixture)
from tests.test_slurm_launch import SBATCH, stage_env

HOST = socket.gethostname().split(".")[0]


def bash(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source launch/common.sh; {script}"], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=dict(os.environ, **env))


def test_launcher_handles_78_without_slurm_and_status_explains_it(tmp_path):
    from longcat_megatron.status import RunStatus, render

    codes, sdc, history = tmp_path / "codes", tmp_path / "sdc", tmp_path / "history"
    codes.write_text("78\n78\n")
    sdc.write_text("3\t1\tgpu-a\tloss 2.5 != replay 2.6\n3\t5\tgpu-b\tgrad norm differs\n3\t4\tgpu-a\tx\n")
    out = bash(f'lc_stopped_for_sdc "{codes}" "{sdc}"; echo "rc=$? hosts=$LC_SDC_HOSTS"; '
               f'lc_stopped_for_sdc /nonexistent "{sdc}"; echo "rc=$?"; '
               f'lc_merge_hostlist "(null)" "gpu-b,gpu-c" "gpu-a,gpu-b"; lc_merge_hostlist "(null)"; '
               # the decision: requeue twice (history lines), then MAX_SDC_REQUEUES=2 stops it
               f'for r in 0 1 2; do lc_sdc_decision "{history}" 7 $r "{sdc}"; echo "decision=$?"; done',
               MAX_SDC_REQUEUES="2")
    words = out.stdout.split()
    assert [w for w in words if w.startswith("rc=")] == ["rc=0", "rc=1"], out
    assert "hosts=gpu-a,gpu-b" in words, out
    assert "gpu-b,gpu-c,gpu-a" in words, out
    assert [w for w in words if w.startswith("decision=")] == ["decision=0", "decision=0", "decision=1"]
    assert "suspect: rank 5 on host gpu-b at iteration 3: grad norm differs" in out.stdout
    assert "silent data corruption detected (exit 78" in out.stdout
    assert "excluding suspect host(s) gpu-a,gpu-b" in out.stdout and "MAX_SDC_REQUEUES=2" in out.stdout
    assert history.read_text() == "7 0 3 gpu-a,gpu-b\n7 1 3 gpu-a,gpu-b\n"
    # an empty SDC file: still exit 78, requeued without exclusion
    out = bash(f': > "{sdc}"; lc_stopped_for_sdc "{codes}" "{sdc}" && lc_sdc_decision "{history}" 8 0 "{sdc}"; '
               f'echo "rc=$? hosts=[$LC_SDC_HOSTS]"')
    assert "rc=0 hosts=[]" in out.stdout and "no suspect host was recorded" in out.stdout, out
    assert "without excluding any node" in out.stdout
    st = RunStatus(run_dir=str(tmp_path))
    st.launches.failures.append(("2026-01-01T00:00", 78, "job=1 restart=0"))
    text = render(st)
    assert "exit 78 at 2026-01-01T00:00 (job=1 restart=0): silent data corruption detected" in text
    assert "MAX_SDC_REQUEUES" in text


def test_requeue_excluding_merges_and_falls_back():
    """lc_requeue_excluding with a stub scontrol: requeuehold, update with the merged ExcNodeList (the
    job's own exclusions kept), release, exit 0; a failed update still releases; a failed requeuehold
    returns 1 (the caller then requeues plainly)."""
    stub = ('scontrol() { echo "scontrol $*" >&2; case "$1 $2" in "-o show") echo "JobId=5 ExcNodeList=gpu-z";; '
            'requeuehold*) return "$HOLD";; update*) return "$UPDATE";; show\\ hostnames) return 1;; esac; }; '
            'SLURM_JOB_ID=5; ')
    out = bash(stub + '(HOLD=0 UPDATE=0 lc_requeue_excluding gpu-a,gpu-z); echo "exit=$?"; '
               '(HOLD=0 UPDATE=1 lc_requeue_excluding gpu-a); echo "exit=$?"; '
               '(HOLD=1 lc_requeue_excluding gpu-a; echo "returned=$?")')
    lines, calls = out.stdout.splitlines(), [c for c in out.stderr.splitlines() if "show" not in c]
    assert calls == ["scontrol requeuehold 5", "scontrol update JobId=5 ExcNodeList=gpu-z,gpu-a",
                     "scontrol release 5"] * 2 + ["scontrol requeuehold 5"], out
    assert lines[:2] == ["[launch] job 5 requeued excluding node(s) gpu-z,gpu-a (ExcNodeList)", "exit=0"], out
    assert "failed: the job is requeued WITHOUT excluding gpu-a" in out.stdout
    assert "requeuehold failed: requeueing without excluding gpu-a" in out.stdout and "returned=1" in lines


def test_local_run_returns_78_with_the_suspects(tmp_path):
    """lc_run_local (no SLURM) with a fake training command: exit 78, suspects logged, no rerun."""
    fake = fake_training(tmp_path)
    out = subprocess.run(["bash", "-c", 'source launch/common.sh; lc_setup_env; '
                          f'lc_train_cmd() {{ LC_TRAIN=("$LONGCAT_ROOT/launch/rank.sh" "{fake}"); }}; '
                          'lc_run_local; echo "rc=$?"'],
                         cwd=ROOT, text=True, capture_output=True, timeout=120,
                         env=dict(os.environ, LONGCAT_CPU="1", CONFIG="configs/tiny.yaml"))
    assert "rc=78" in out.stdout.split(), out
    assert f"suspect: rank 1 on host {HOST} at iteration 3: fake bit flip" in out.stdout, out
    assert "would be requeued without the suspect node(s)" in out.stdout


def fake_training(tmp_path) -> str:
    """A training command that behaves like a run detecting SDC on rank 1 at iteration 3."""
    path = tmp_path / "fake_train.sh"
    path.write_text("#!/usr/bin/env bash\n"
                    'if [ "$RANK" = 1 ]; then\n'
                    '    printf "3\\t1\\t%s\\tfake bit flip\\n" "$(hostname -s)" >> "$LONGCAT_SDC_FILE"\n'
                    "else\n    sleep 1\nfi\n"
                    'echo "fake training: exit 78 on rank $RANK"\nexit 78\n')
    path.chmod(0o755)
    return str(path)


def assert_requeued_without_this_node(job: Job, ckpt) -> None:
    """After the first run: PENDING again (Restarts=1) with this node excluded, the log naming the
    suspect host and exit 78, one SDC requeue in the history. Cancels the job."""
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            f = job.fields()
            # right after the requeue Reason is BeginTime (then BadConstraints: no node left)
            if f.get("Restarts") == "1" and HOST in f.get("ExcNodeList", "").split(",") \
                    and f.get("Reason") == "BadConstraints":
                break
            assert f.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), (f, job.text()[-3000:])
            time.sleep(0.5)
        else:
            raise AssertionError(f"job {job.id} not requeued excluding {HOST}: {job.fields()}\n{job.text()[-3000:]}")
        log = job.text()
        assert f["JobState"] == "PENDING", f
        assert "restart 1:" not in log, log[-3000:]   # it did not run again (on the excluded node)
        assert "silent data corruption detected (exit 78" in log, log[-3000:]
        assert f"suspect: rank 1 on host {HOST} at iteration 3" in log
        assert f"job {job.id} requeued excluding node(s) {HOST} (ExcNodeList)" in log, log[-3000:]
        history = open(os.path.join(ckpt, ".longcat-sdc-requeues")).read()
        assert history.startswith(f"{job.id} 0 3 {HOST}"), history
    finally:
        subprocess.run(["scancel", job.id], env=job.env, timeout=30)
    job.finish(timeout=60)


def test_pretrain_sdc_is_requeued_without_the_suspect_node(slurm_cluster, tmp_path):  # noqa: F811
    """The real launch/pretrain.sh: a bit flip injected on rank 1 at iteration 3 is detected (exit 78)."""
    ckpt = tmp_path / "ckpt"
    env = stage_env(slurm_cluster, ckpt, LONGCAT_FAULT_INJECT="bit_flip:3:1",
                    LONGCAT_FAULT_ONCE=str(tmp_path / "fault-once"))
    job = Job("launch/pretrain.sh", env, str(tmp_path / "job.log"),
              args=["train.deterministic=true", "train.sdc_check_interval=1"], sbatch_args=SBATCH)
    assert_requeued_without_this_node(job, ckpt)
