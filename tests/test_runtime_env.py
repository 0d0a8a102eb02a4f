"""What runtime.init_distributed reads from its environment (no GPU here: torch.cuda is monkeypatched).

* ``parallel.backend: auto`` without usable CUDA where GPUs were evidently expected (SLURM allocated
  some, CUDA_VISIBLE_DEVICES names some, an NVIDIA driver is installed) is an error naming the cause
  (CPU-only torch wheel, hidden devices, driver) and the fix; it used to fall back to gloo on the CPU.
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

    for name in _SCRUB:
        monkeypatch.delenv(name, raising=False)
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
