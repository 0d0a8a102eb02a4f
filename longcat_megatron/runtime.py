"""Distributed runtime: torch.distributed + megatron-core parallel_state + seeding.

Reads the launcher's environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or
SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and node list when started by ``srun`` directly), picks
NCCL+CUDA when a GPU is usable and gloo+CPU when the run asked for the CPU or nothing suggests GPUs (an
error when GPUs were evidently expected but CUDA is unusable), applies the CPU adaptations only on CPU,
and builds megatron-core's tensor/pipeline/context/expert/data parallel groups.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from longcat_megatron import cpu_compat, mcore_fixes
from longcat_megatron.errors import UserInputError


class ParallelSizeError(UserInputError):
    """The parallel sizes do not fit the world size or the model."""


@dataclass(frozen=True)
class Layout:
    """Resolved parallel layout of this job."""

    world: int
    tensor: int
    pipeline: int
    context: int
    expert: int
    data: int
    virtual_pipeline: Optional[int] = None
    # Expert tensor-parallel size; None = tensor (megatron's default).
    expert_tensor: Optional[int] = None

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    @property
    def expert_data(self) -> int:
        """Expert data-parallel size: the replicas of each expert shard."""
        return max(1, self.world // (self.pipeline * self.expert * self.expert_tensor_size))

    def describe(self) -> str:
        vpp = f" VPP={self.virtual_pipeline}" if self.virtual_pipeline else ""
        etp = (f" x ETP{self.expert_tensor}" if self.expert_tensor not in (None, self.tensor)
               else "")
        return (
            f"world={self.world} = TP{self.tensor} x CP{self.context} x PP{self.pipeline} x "
            f"DP{self.data} (EP{self.expert}{etp} inside DPxCPxTP){vpp}"
        )


def resolve_layout(
    world: int,
    tensor: int = 1,
    pipeline: int = 1,
    context: int = 1,
    expert: int = 1,
    virtual_pipeline: Optional[int] = None,
    num_experts: Optional[int] = None,
    expert_tensor: Optional[int] = None,
) -> Layout:
    """Check the sizes against the world size and return the layout, or raise ParallelSizeError."""
    model_parallel = tensor * pipeline * context
    if world % model_parallel:
        raise ParallelSizeError(
            f"world size {world} is not divisible by tensor ({tensor}) x pipeline ({pipeline}) x "
            f"context ({context}) = {model_parallel}; change the number of processes or the sizes"
        )
    data = world // model_parallel
    # megatron-core places expert parallelism inside the (data x context x tensor) ranks of a stage
    # (expert-tensor size defaults to tensor).
    etp = tensor if expert_tensor is None else expert_tensor
    if expert_tensor is not None and expert_tensor < 1:
        raise ParallelSizeError(f"expert tensor parallel size {expert_tensor} must be >= 1")
    if (data * context * tensor) % (expert * etp):
        raise ParallelSizeError(
            f"expert parallel size {expert} x expert tensor size {etp} = {expert * etp} does not "
            f"divide data ({data}) x context ({context}) x tensor ({tensor}) = "
            f"{data * context * tensor} ranks per pipeline stage; use sizes whose product divides it"
        )
    if num_experts is not None and num_experts % expert:
        raise ParallelSizeError(
            f"expert parallel size {expert} does not divide the number of experts {num_experts}"
        )
    if virtual_pipeline is not None and pipeline < 2:
        raise ParallelSizeError("virtual pipeline stages need pipeline parallel size >= 2")
    return Layout(world, tensor, pipeline, context, expert, data, virtual_pipeline, expert_tensor)


# Warnings megatron-core prints on every start without TransformerEngine/Apex; they say nothing an
# operator can act on, and hide the progress lines. Silenced by the CLIs only.
_KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r"When using async grad allreduce it is recommended.*",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor.*",
    r"Please use DTensor instead.*",
    r"`load_state_dict` is deprecated.*",
    r"`torch\.distributed\.\w+` is deprecated.*",
)


def silence_known_warnings() -> None:
    """Hide megatron-core's start-up warnings that are expected on CPU / without TE."""
    import warnings

    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def _env_int(*names: str, default: Optional[int] = None) -> Optional[int]:
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return int(os.environ[n])
    return default


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM; (0, 1, 0) when run bare."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def started_by_srun(env=None) -> bool:
    """True when ``srun`` started this process directly (one task per rank, no torchrun): SLURM's
    task variables are set and torchrun's are not."""
    env = os.environ if env is None else env
    return env.get("RANK", "") == "" and env.get("SLURM_PROCID", "") != ""


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("LONGCAT_FORCE_CPU") != "1"


# --- SLURM host lists and the rendezvous address ----------------------------------------------------
def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list (``gpu[001-004,010],login1``, ``r[1-2]-n[01-02]``) as host names,
    in SLURM's order. Raises ValueError for a malformed list."""
    hosts: list[str] = []
    depth, item = 0, ""
    for ch in spec.strip() + ",":
        if ch == "," and depth == 0:
            if item:
                hosts.extend(_expand_host(item))
            item = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"malformed SLURM host list {spec!r}")
        item += ch
    if depth:
        raise ValueError(f"malformed SLURM host list {spec!r}")
    return hosts


def _expand_host(item: str) -> list[str]:
    if "[" not in item:
        if "]" in item:
            raise ValueError(f"malformed SLURM host name {item!r}")
        return [item]
    prefix, rest = item.split("[", 1)
    ranges, _, suffix = rest.partition("]")
    tails = _expand_host(suffix) if suffix else [""]
    out = []
    for part in ranges.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise ValueError(f"malformed range {part!r} in SLURM host list item {item!r}")
        for n in range(int(lo), int(hi if dash else lo) + 1):
            out.extend(prefix + str(n).zfill(len(lo)) + t for t in tails)
    return out


def first_host(spec: str) -> str:
    """The first host of a SLURM host list (``scontrol show hostnames`` when our parser cannot read it)."""
    try:
        hosts = expand_hostlist(spec)
    except ValueError:
        import subprocess

        try:
            out = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if not out:
            raise UserInputError(f"cannot read the SLURM host list {spec!r} (nor can `scontrol show "
                                 "hostnames`): export MASTER_ADDR=<host of rank 0>") from None
        return out[0]
    if not hosts:
        raise UserInputError(f"the SLURM host list {spec!r} is empty: export MASTER_ADDR=<host of rank 0>")
    return hosts[0]


def rendezvous_address(env=None) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) for ``init_process_group``: the exported values; when ``srun``
    started the ranks directly, the first host of the step's (else the job's) node list, where task 0
    runs, and port 20000 + job id % 20000 (the batch launcher's rule); else 127.0.0.1:29500."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    if started_by_srun(env):
        if not addr:
            nodes = next((env[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                          if env.get(n)), "")
            addr = first_host(nodes) if nodes else ""
        if not port and env.get("SLURM_JOB_ID", "").isdigit():
            port = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return addr or "127.0.0.1", port or "29500"


# --- backend and device -----------------------------------------------------------------------------
class BackendError(UserInputError):
    """The requested (or evidently expected) CUDA/NCCL set-up is not usable in this process."""


_HIDDEN = ("", "-1", "none", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that show no device


def gpu_evidence(env=None) -> list[str]:
    """What says this process is meant to train on GPUs (empty: nothing does)."""
    import glob
    import shutil

    env = os.environ if env is None else env
    found = []
    count = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if count and count != "0":
        found.append(f"SLURM allocated GPUs: SLURM_GPUS_ON_NODE={count}")
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(name, "").strip():
            found.append(f"SLURM allocated GPUs: {name}={env[name].strip()}")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in _HIDDEN:
        found.append(f"CUDA_VISIBLE_DEVICES={visible.strip()}")
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        found.append(f"nvidia-smi is installed: {smi}")
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if devices:
        found.append(f"NVIDIA device files exist: {devices[0]}{' ...' if len(devices) > 1 else ''}")
    return found


def _cuda_init_error() -> str:
    """torch's own reason why CUDA does not initialise ('' when it does)."""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - any failure is the reason we report
        return " ".join(str(e).split())
    return ""


def cuda_unusable_reason(env=None) -> tuple[str, str]:
    """(cause, fix) for ``torch.cuda.is_available()`` being False."""
    env = os.environ if env is None else env
    version = torch.__version__.split("+")[0]
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)",
                f"install the CUDA build of torch {version} into this environment (README, "
                f"'Dependencies'; e.g. pip install torch=={version} --index-url "
                "https://download.pytorch.org/whl/cu128: the cuXYZ index of a CUDA version the node's "
                "driver supports)")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in _HIDDEN:
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process",
                "do not clear CUDA_VISIBLE_DEVICES (ask SLURM for GPUs: --gpus-per-node / "
                "--gpus-per-task)")
    detail = _cuda_init_error()
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
    return (f"torch {torch.__version__} is built for {built}, but no GPU is usable"
            f"{': ' + detail if detail else ''}",
            f"check the GPU driver on this node (`nvidia-smi` must list the GPUs; the driver must "
            f"support {built}) and that the job was given GPUs")


def _cpu_hint() -> str:
    return ("To train on the CPU on purpose, run the launcher with LONGCAT_CPU=1 (or set "
            "parallel.backend=gloo).")


def choose_backend(backend: str = "auto") -> str:
    """'nccl' or 'gloo' for ``parallel.backend``. ``auto`` is NCCL when CUDA is usable, gloo when the
    run asked for CPU (LONGCAT_FORCE_CPU=1, which LONGCAT_CPU=1 sets) or nothing suggests GPUs; when
    GPUs were evidently expected (SLURM allocated some, CUDA_VISIBLE_DEVICES names some, an NVIDIA
    driver is installed) but CUDA is not usable, it is a :class:`BackendError` naming the cause and
    the fix instead of hours of training on the CPU."""
    if backend == "gloo":
        return "gloo"
    force_cpu = os.environ.get("LONGCAT_FORCE_CPU") == "1"
    if backend == "nccl":
        if force_cpu:
            raise BackendError("parallel.backend=nccl, but LONGCAT_FORCE_CPU=1 (LONGCAT_CPU=1) asks for "
                               "the CPU: drop one of the two (CPU runs use parallel.backend=gloo)")
        if not torch.cuda.is_available():
            cause, fix = cuda_unusable_reason()
            raise BackendError(f"parallel.backend=nccl needs a usable CUDA GPU, and this process has "
                               f"none. Cause: {cause}. Fix: {fix}. {_cpu_hint()}")
        return "nccl"
    if backend != "auto":
        raise BackendError(f"parallel.backend={backend!r}: use auto, gloo or nccl")
    if use_cuda():
        return "nccl"
    if force_cpu:
        return "gloo"
    evidence = gpu_evidence()
    if evidence:
        cause, fix = cuda_unusable_reason()
        raise BackendError(f"no usable CUDA GPU, but this process is evidently meant to train on GPUs "
                           f"({'; '.join(evidence)}): parallel.backend=auto would fall back to gloo "
                           f"on the CPU. Cause: {cause}. Fix: {fix}. {_cpu_hint()}")
    return "gloo"


def choose_cuda_device(local_rank: int, env=None) -> int:
    """The CUDA device index for this process: 0 when it sees exactly one GPU (srun's per-task binding,
    ``--gpus-per-task=1`` / ``--gpu-bind=single:1``, gives every task its own, as device 0), else its
    local rank, which must be below the number of visible GPUs."""
    env = os.environ if env is None else env
    count = torch.cuda.device_count()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    seen = f"{count} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    local_world = env.get("LOCAL_WORLD_SIZE", "")
    if count == 1 and local_world.isdigit() and int(local_world) > 1:
        raise BackendError(f"{local_world} processes on this node (LOCAL_WORLD_SIZE) share the one GPU "
                           f"this process sees ({seen}): start one process per GPU "
                           "(torchrun --nproc-per-node = visible GPUs)")
    if count == 1:
        return 0
    if local_rank >= count:
        names = "SLURM_LOCALID" if started_by_srun(env) else "LOCAL_RANK"
        raise BackendError(f"local rank {local_rank} ({names}) has no GPU of its own: this process sees "
                           f"{seen}. Start at most one task per visible GPU on each node, or bind one GPU "
                           "to each task (srun --gpus-per-task=1 or --gpu-bind=single:1)")
    return local_rank


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise torch.distributed (idempotent). Returns (rank, world_size).

    Creates only the default process group; megatron-core's groups (and their gloo twins) come from
    :func:`init_parallel_state`. No world-wide gloo group is created (at 1,000+ ranks its TCP mesh of
    world - 1 sockets per rank slowed every start and ran into open-file limits)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local = launcher_env()
    backend = choose_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(choose_cuda_device(local))
    else:
        cpu_compat.apply()
    mcore_fixes.apply()
    addr, port = rendezvous_address()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes)
    )
    return rank, world


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT of single-machine runs)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel_state(layout: Layout) -> None:
    """Build megatron-core's process groups for ``layout`` (destroying earlier ones)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank (so that init is reproducible), then
    megatron-core's model-parallel RNG tracker (different streams per TP/EP rank, as megatron does)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor: int = 1,
    pipeline: int = 1,
    context: int = 1,
    expert: int = 1,
    virtual_pipeline: Optional[int] = None,
    num_experts: Optional[int] = None,
    seed: int = 1234,
    backend: str = "auto",
    expert_tensor: Optional[int] = None,
) -> Layout:
    """Everything a training or test process needs before building a model."""
    rank, world = init_distributed(backend)
    layout = resolve_layout(world, tensor, pipeline, context, expert, virtual_pipeline, num_experts,
                            expert_tensor)
    init_parallel_state(layout)
    set_seed(seed)
    return layout


def shutdown() -> None:
    """Destroy parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")
