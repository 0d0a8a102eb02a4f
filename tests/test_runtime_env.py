"""What runtime.init_distributed reads from its environment (no GPU here: torch.cuda is monkeypatched).

* ``parallel.backend: auto`` without usable CUDA where GPUs were evidently expected (SLURM allocated
  some, CUDA_VISIBLE_DEVICES names some, an NVIDIA driver is installed) is an error naming the cause
  (CPU-only torch wheel, hidden devices, driver) and the fix; it used to fall back to gloo on the CPU.
* ``srun`` starting the ranks directly: the device from what the task sees (per-task GPU binding gives
  each task one GPU, device 0), MASTER_ADDR from the first host of SLURM's compressed node list (it
  used to be 127.0.0.1 on every node), MASTER_PORT from the job id.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from longcat_megatron import runtime
from longcat_megatron.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
          "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS",
          "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "LONGCAT_FORCE_CPU")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean launcher environment; no nvidia-smi on PATH and no /dev/nvidia* (both patchable)."""
    import glob

    for name in _SCRUB:  # set first, so that the undo also removes what the code under test sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", str(tmp_path))
    devices: list = []
    real_glob = glob.glob
    monkeypatch.setattr(glob, "glob", lambda p, *a, **k: list(devices) if p.startswith("/dev/nvidia")
                        else real_glob(p, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    set_env.devices = devices
    set_env.bin = tmp_path
    return set_env


# ---- SLURM host lists ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec, hosts", [
    ("gpu[001-004,010],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "login1"]),
    ("node7", ["node7"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("a[08-10]", ["a08", "a09", "a10"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("x[3],y-1,z[0-1]b", ["x3", "y-1", "z0b", "z1b"]),
    ("", []),
])
def test_expand_hostlist(spec, hosts):
    assert runtime.expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["gpu[001-", "gpu]1", "gpu[a-b]", "gpu[4-2]", "g[[1]]"])
def test_malformed_hostlist_is_refused(spec, env):
    with pytest.raises(ValueError):
        runtime.expand_hostlist(spec)
    with pytest.raises(UserInputError, match="MASTER_ADDR"):  # no scontrol on PATH to ask instead
        runtime.first_host(spec)


def test_rendezvous_under_srun_is_the_first_node_and_a_port_from_the_job_id(env):
    env(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="login1,gpu[001-004]", SLURM_STEP_NODELIST="gpu[003-004]")
    assert runtime.started_by_srun()
    assert runtime.launcher_env() == (5, 16, 1)
    assert runtime.rendezvous_address() == ("gpu003", str(20000 + 123456 % 20000))
    os.environ.pop("SLURM_STEP_NODELIST")
    assert runtime.rendezvous_address()[0] == "login1"
    env(MASTER_ADDR="10.1.2.3", MASTER_PORT="31000")  # exported values win
    assert runtime.rendezvous_address() == ("10.1.2.3", "31000")


def test_rendezvous_under_torchrun_is_left_to_torchrun(env):
    env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", SLURM_PROCID="0", SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="gpu[001-002]")
    assert not runtime.started_by_srun()
    assert runtime.rendezvous_address() == ("127.0.0.1", "29500")
    env(MASTER_ADDR="gpu001", MASTER_PORT="20007")
    assert runtime.rendezvous_address() == ("gpu001", "20007")


# ---- the CUDA device of a rank ------------------------------------------------------------------
def test_device_from_what_the_task_sees(env, monkeypatch):
    env(SLURM_PROCID="3", SLURM_LOCALID="3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task=1: its own GPU
    assert runtime.choose_cuda_device(3) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # every task sees the node's 8
    assert runtime.choose_cuda_device(3) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env(CUDA_VISIBLE_DEVICES="4,5")
    with pytest.raises(runtime.BackendError, match=r"local rank 3 \(SLURM_LOCALID\).*2 GPU\(s\) "
                       r"\(CUDA_VISIBLE_DEVICES=4,5\).*--gpus-per-task=1"):
        runtime.choose_cuda_device(3)


def test_torchrun_ranks_sharing_one_visible_gpu_is_an_error(env, monkeypatch):
    env(RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(runtime.BackendError, match="2 processes on this node"):
        runtime.choose_cuda_device(1)
    env(LOCAL_WORLD_SIZE="1")
    assert runtime.choose_cuda_device(0) == 0


def test_srun_started_rank_with_per_task_binding_initialises(env, monkeypatch):
    """Task 11 of 16 (local id 3) on the second node, bound to one GPU: it used to call
    set_device(3) (invalid: it sees one GPU) and rendezvous at 127.0.0.1 (its own node)."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(
        ("init", kw["backend"], kw["rank"], kw["world_size"], os.environ["MASTER_ADDR"],
         os.environ["MASTER_PORT"])))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("device", index)))
    env(SLURM_PROCID="11", SLURM_NTASKS="16", SLURM_LOCALID="3", SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="gpu[007-008]", CUDA_VISIBLE_DEVICES="3")
    assert runtime.init_distributed("nccl") == (11, 16)
    assert calls == [("device", 0), ("init", "nccl", 11, 16, "gpu007", str(20000 + 4242))], calls


# ---- no silent CPU fallback ---------------------------------------------------------------------
def test_auto_without_any_sign_of_gpus_is_gloo(env):
    assert runtime.choose_backend("auto") == "gloo"
    assert runtime.gpu_evidence() == []


def test_auto_with_a_cpu_wheel_on_a_gpu_allocation_is_an_error(env, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    env(SLURM_GPUS_ON_NODE="8", SLURM_JOB_GPUS="0,1,2,3,4,5,6,7")
    with pytest.raises(runtime.BackendError) as e:
        runtime.choose_backend("auto")
    msg = str(e.value)
    assert "SLURM_GPUS_ON_NODE=8" in msg and "fall back to gloo" in msg
    assert "CPU-only build" in msg and f"pip install torch=={torch.__version__.split('+')[0]} " in msg
    assert "LONGCAT_CPU=1" in msg and "parallel.backend=gloo" in msg
    # what the CPU tests and the local SLURM cluster (fake GPUs) set: CPU asked for, no error
    env(LONGCAT_FORCE_CPU="1")
    assert runtime.choose_backend("auto") == "gloo"
    assert runtime.choose_backend("gloo") == "gloo"


def test_auto_with_a_broken_driver_names_torchs_reason(env, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(runtime, "_cuda_init_error", lambda: "Found no NVIDIA driver on your system.")
    (env.bin / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (env.bin / "nvidia-smi").chmod(0o755)
    with pytest.raises(runtime.BackendError) as e:
        runtime.choose_backend("auto")
    msg = str(e.value)
    assert "nvidia-smi is installed" in msg and "built for CUDA 12.8" in msg
    assert "Found no NVIDIA driver" in msg and "driver on this node" in msg


def test_auto_with_visible_devices_that_torch_cannot_see(env, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(runtime, "_cuda_init_error", lambda: "")
    env.devices.append("/dev/nvidia0")
    env(CUDA_VISIBLE_DEVICES="0,1")
    with pytest.raises(runtime.BackendError, match=r"CUDA_VISIBLE_DEVICES=0,1; NVIDIA device files exist: /dev/nvidia0"):
        runtime.choose_backend("auto")
    env(CUDA_VISIBLE_DEVICES="", SLURM_STEP_GPUS="2")
    with pytest.raises(runtime.BackendError, match="hides every GPU"):
        runtime.choose_backend("auto")


def test_explicit_nccl_without_cuda_or_with_force_cpu_is_an_error(env, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(runtime.BackendError, match="parallel.backend=nccl needs a usable CUDA GPU.*CPU-only"):
        runtime.choose_backend("nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.choose_backend("nccl") == "nccl"
    env(LONGCAT_FORCE_CPU="1")
    with pytest.raises(runtime.BackendError, match="LONGCAT_FORCE_CPU=1"):
        runtime.choose_backend("nccl")


def test_the_trainer_stops_with_exit_2_and_the_message(tmp_path):
    """The real CLI on this CPU-only torch, as a rank of a GPU allocation would start: exit 2, one
    message, nothing trained."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", SLURM_GPUS_ON_NODE="8", PYTHONPATH=ROOT,
               TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "longcat_megatron.train", "--config",
                          os.path.join(ROOT, "configs", "tiny.yaml"), f"checkpoint.save={tmp_path}/ck"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "evidently meant to train on GPUs (SLURM allocated GPUs: SLURM_GPUS_ON_NODE=8)" in out.stderr
    assert "CPU-only build" in out.stderr and "LONGCAT_CPU=1" in out.stderr
    assert not (tmp_path / "ck").exists()
