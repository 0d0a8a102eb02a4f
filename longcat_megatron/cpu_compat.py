"""What megatron-core 0.16.1 needs to run on a CPU-only torch with gloo.

megatron-core assumes CUDA in a few hundred places (``torch.cuda.current_device()``, literal
``device='cuda'``, CUDA streams, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks, the CUDA RNG
tracker) and uses collectives that NCCL accepts but gloo rejects (uneven all-gathers, tensors as
all-to-all split sizes). Every adaptation lives here, each in its own function with a test in
``tests/test_cpu_compat.py``. :func:`apply` is a no-op when CUDA is available, so GPU runs take
megatron-core's own code paths unchanged.

Call :func:`apply` after ``import torch`` and before building any megatron-core object
(:func:`longcat_megatron.runtime.initialize` does it).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

_APPLIED: list[str] = []


def needed() -> bool:
    """True when this process runs without CUDA (the shims are needed)."""
    return not torch.cuda.is_available() or os.environ.get("LONGCAT_FORCE_CPU") == "1"


def applied() -> list[str]:
    """Names of the adaptations applied in this process (empty on CUDA)."""
    return list(_APPLIED)


# --------------------------------------------------------------------------------------- torch level
def patch_current_device() -> None:
    """``torch.cuda.current_device()`` -> cpu device (used as ``device=`` in ~200 megatron sites)."""
    torch.cuda.current_device = lambda: torch.device("cpu")


class _NoopEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoopStream:
    def __init__(self, *a, **k):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        return event or _NoopEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


def patch_streams() -> None:
    """CUDA streams, events, synchronize and NVTX ranges become no-ops (CPU ops are synchronous)."""
    stream = _NoopStream()
    torch.cuda.Stream, torch.cuda.Event = _NoopStream, _NoopEvent
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext(s)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.nvtx.range_push = torch.cuda.nvtx.range_pop = lambda *a, **k: None
    torch.cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TO = torch.Tensor.to
_TENSOR_PIN = torch.Tensor.pin_memory


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device='cuda'``, ``.cuda()``, ``.to('cuda')`` and ``pin_memory`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA or func is _TENSOR_PIN:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def patch_cuda_device_literals() -> None:
    """Enter :class:`CudaToCpuMode` for the process (optimizer, clip_grads, schedules use 'cuda')."""
    global _MODE
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()


def patch_tensor_type() -> None:
    """``Tensor.type()`` of a CPU tensor reports ``torch.cuda.*``.

    The distributed optimizer and grad clipping dispatch on the type string and reject CPU tensors
    (``distrib_optimizer.py`` 'Wrapped parameters must be one of torch.cuda.FloatTensor, ...').
    """
    orig = torch.Tensor.type
    if getattr(orig, "_longcat_spoof", False):
        return

    def _type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            name = orig(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return orig(self, dtype, non_blocking, **kw)

    _type._longcat_spoof = True
    torch.Tensor.type = _type


# ------------------------------------------------------------------------------------ megatron level
def patch_rng_tracker() -> None:
    """The model-parallel RNG tracker keeps CPU generator states instead of CUDA ones.

    Separate TP/EP/DP streams stay separate, so dropout and ``use_cpu_initialization=False`` work.
    """
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    # _get_all_rng_states / checkpoint code read the "cuda" state: use the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: None


def patch_moe_split_sizes() -> None:
    """Alltoall token dispatcher: split sizes become numpy on CPU too (gloo's all_to_all_single
    rejects tensors; ``moe_utils.maybe_move_tensor_to_cpu`` converts only CUDA tensors)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    orig = moe_utils.maybe_move_tensor_to_cpu
    if getattr(orig, "_longcat", False):
        return

    def move(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    move._longcat = True
    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move


def patch_uneven_collectives() -> None:
    """Uneven all-gather / reduce-scatter along dim 0 (gloo rejects unequal sizes): pad to the
    largest piece, gather, slice; reduce-scatter as all-reduce + slice."""
    from megatron.core.tensor_parallel import mappings

    orig_gather = mappings._gather_along_first_dim
    orig_rs = mappings._reduce_scatter_along_first_dim
    if getattr(orig_gather, "_longcat", False):
        return

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        biggest = max(sizes)
        x = input_.contiguous()
        if x.shape[0] < biggest:
            x = torch.cat([x, x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))])
        out = x.new_empty((biggest * group.size(),) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return torch.cat([out[i * biggest: i * biggest + s] for i, s in enumerate(sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return orig_rs(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        buf = input_.contiguous().clone()
        dist.all_reduce(buf, group=group)
        start = sum(sizes[: group.rank()])
        return buf[start: start + sizes[group.rank()]].clone()

    gather._longcat = True
    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


ADAPTATIONS = (
    patch_current_device,
    patch_streams,
    patch_cuda_device_literals,
    patch_tensor_type,
    patch_rng_tracker,
    patch_moe_split_sizes,
    patch_uneven_collectives,
)


def apply(force: bool = False) -> list[str]:
    """Apply every CPU adaptation once (no-op with CUDA unless ``force``). Returns their names."""
    if _APPLIED or not (force or needed()):
        return applied()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's @jit_fuser would compile on CPU
    for fn in ADAPTATIONS:
        fn()
        _APPLIED.append(fn.__name__)
    return applied()
