"""One command that runs the real GPU path on one GPU (NCCL, world size 1, bf16) and prints a table.

    bash bench/fetch_gpu_wheels.sh          # once, on a machine with PyPI access: wheels -> .whl/
    python bench/gpu_check.py               # on the GPU machine (meant to take under 8 minutes on one H100)
    python bench/gpu_check.py --cpu         # the same steps at tiny sizes on CPU (gloo); CI runs this

Steps (``--skip`` names; each check is a row, the command exits 1 if any fails):

1. train: the tiny LongCat with the N-gram Embedding, zero experts, the budget controller and MTP
   (``configs/tiny_longcat_ngram.yaml`` at world size 1, bf16 ``Float16Module`` + megatron DDP +
   distributed optimizer, grouped experts) for N steps, save, resume for M more, and compare with
   a straight N+M-step run: losses of the resumed steps and every model tensor of the two final
   checkpoints must be bitwise equal (CUDA runs with deterministic algorithms on);
2. export: ``ckpt_convert.to_hf --verify`` on the resumed run's checkpoint (a CPU subprocess: the
   exported model's logits against our model's, fp32, 1e-5 relative);
3. wrapper: the same run through ``loop.train`` with ``parallel.overlap_grad_reduce`` and
   ``parallel.overlap_param_gather`` on and DDP buckets of ``BUCKET_PARAMS`` parameters (dozens of
   buckets), probed inside ``build_optimizer`` (the model and optimizer as training built them,
   before any step) and after the run; invariants that need no second replica: routing state
   fp32/fp64 through ``Float16Module``; RoPE ``inv_freq`` fp32 and cos/sin from fp32 angles; the
   distributed optimizer's main params and Adam moments fp32; local experts pairwise distinct at
   init; no forward reads a parameter while its bucket's all-gather is open (on DP > 1 it would
   see last step's values); the N+M steps run (megatron asserts ``param_gather_handle is None``
   otherwise); losses equal those of step 1's straight run with both overlaps off (``LOSS_RTOL``);
4. layer: one LongCat-Flash-Lite-width shortcut layer (hidden 3072, 32 heads, the Lite MLA ranks from
   ``configs/longcat_flash_lite.yaml``, top-12 over FFN + zero experts, FFN experts scaled down to fit
   one GPU) at sequence 8192, micro-batch 1, forward + backward in bf16: step ms, peak GPU memory and
   achieved TFLOP/s from the layer's FLOP count (causal attention counted as half the s x s products;
   FFN-expert FLOPs from the tokens the router really sent to FFN experts);
5. documents: one Lite-width MLA block at that sequence with packed documents, as a ``DocumentMask``
   (per-document attention, the path the dispatch takes here) and as the dense mask it stands for:
   outputs and input gradients must agree (bf16: 2e-2 of the largest value), and the step ms and
   peak memory of both are reported;
6. varlen: per-document attention in one flash varlen call vs one SDPA call per document piece on an
   SFT-like pack (64 conversations in 8192 tokens): the dispatch must take varlen on this GPU; core
   attention outputs and q/k/v gradients (one sample, two samples with their own layouts, the two
   query chunks of each rank of an emulated CP=2) and a Lite-width MLA block's output, input and
   weight gradients agree (bf16: 2e-2); kernel calls; fwd+bwd ms of both paths. On CPU the kernel
   is the stand-in ``attention.varlen_reference`` (the dispatch must refuse varlen there).
7. determinism: ``train.deterministic=true`` (training/determinism.py: torch deterministic algorithms,
   not warn-only) with the silent-data-corruption replay every step and megatron's rerun state
   machine: two tiny runs bitwise equal (losses, gradient norms), no false alarm (exit 0); then the
   Lite-width layer of step 4 again in deterministic mode: its step time against step 4's (the
   speed cost of ``train.deterministic``), or the op that has no deterministic CUDA kernel.

Without megatron-core installed, the script makes a venv in ``.whl/venv-pyXY`` that sees this
machine's torch (``--system-site-packages``), installs the wheels of ``.whl/`` into it with
``pip install --no-index --find-links .whl`` and re-runs itself there (docs/operations.md, "GPU
check"). On a GPU the table is appended to docs/benchmarks.md (``--no-docs`` to skip) and written to
``--out DIR`` (markdown + JSON) when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# What the check imports beyond torch (megatron-core, HF export/verify, configs, progress).
REQUIREMENTS = ("megatron-core==0.16.1", "transformers==5.23.0", "safetensors", "tokenizers",
                "PyYAML", "numpy", "psutil", "tqdm", "packaging>=24.2")
MODULES = ("megatron.core", "transformers", "safetensors", "tokenizers", "yaml", "numpy", "psutil", "tqdm")
REEXEC_MARK = "LONGCAT_GPU_CHECK_VENV"

# Sizes: "gpu" is what the issue asks for; "cpu" keeps the same steps small enough for CI.
SIZES = {
    "gpu": dict(steps=30, more=10, seq=8192, experts=64, zero_experts=32, iters=5, warmup=2,
                conversations=64),
    "cpu": dict(steps=3, more=2, seq=128, experts=8, zero_experts=4, iters=2, warmup=1,
                conversations=8),
}
STEPS = ("train", "export", "wrapper", "layer", "documents", "varlen", "determinism")
LITE_CONFIG = os.path.join(ROOT, "configs", "longcat_flash_lite.yaml")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")


# ---- dependencies ---------------------------------------------------------------------------------
def _missing_modules() -> list:
    missing = []
    for name in MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def ensure_dependencies() -> None:
    """Re-run inside a venv built from ``.whl/`` when a module the check needs is missing here."""
    missing = _missing_modules()
    if not missing:
        return
    if os.environ.get(REEXEC_MARK):
        sys.exit(f"gpu_check: {', '.join(missing)} still missing inside {sys.prefix}; see docs/operations.md")
    if not os.path.isdir(WHEELS) or not any(n.endswith(".whl") for n in os.listdir(WHEELS)):
        sys.exit(f"gpu_check: {', '.join(missing)} not installed and .whl/ holds no wheels: run "
                 "`bash bench/fetch_gpu_wheels.sh` on a machine with PyPI access first and bring .whl/ "
                 "along (docs/operations.md, 'GPU check')")
    venv = os.path.join(WHEELS, f"venv-py{sys.version_info.major}{sys.version_info.minor}")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"gpu_check: creating {venv} (sees this machine's torch) ...", flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv])
        if made.returncode != 0:  # no ensurepip on this image: a venv without pip, driven from outside
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                            "--clear", venv], check=True)
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    pip = [python, "-m", "pip"] if has_pip else [sys.executable, "-m", "pip", "--python", python]
    # megatron-core alone without dependencies (it declares torch, which must stay this machine's
    # own), then the rest with theirs (numpy, packaging and all HF needs come from .whl/).
    for extra, reqs in ((["--no-deps"], REQUIREMENTS[:1]), ([], REQUIREMENTS[1:])):
        cmd = pip + ["install", "--no-index", "--find-links", WHEELS, "--quiet", *extra, *reqs]
        print("gpu_check: " + " ".join(cmd[len(pip):]), flush=True)
        subprocess.run(cmd, check=True)
    os.environ[REEXEC_MARK] = "1"
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])


# ---- 1. train, save, resume, compare ----------------------------------------------------------------
def _train(overrides: list):
    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.training.loop import train

    try:
        return train(load_config(TINY_CONFIG, overrides))
    finally:
        runtime.shutdown()


def _checkpoint_tensors(root: str) -> dict:
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    reader = TorchDistReader(resolve_checkpoint_dir(root)[0])
    return {k: reader.read(k) for k in reader.model_keys()}


def _train_overrides(size: dict, bf16: bool) -> list:
    """The tiny run of steps 1 and 3 at world size 1: bf16 ``Float16Module`` + megatron DDP +
    distributed optimizer (``training/setup.py``), grouped experts, both overlaps off."""
    return ["parallel.tensor=1", "parallel.sequence_parallel=false",
            f"train.train_iters={size['steps'] + size['more']}",
            f"optimizer.bf16={'true' if bf16 else 'false'}", "parallel.distributed_optimizer=true",
            "model.expert_impl=grouped", "logging.progress=false", "logging.log_interval=1000000"]


def check_resume(work: str, size: dict, bf16: bool) -> dict:
    """N steps + save + M resumed steps vs N+M straight steps: losses and checkpoints bitwise."""
    n, m = size["steps"], size["more"]
    base = _train_overrides(size, bf16)
    split, straight = os.path.join(work, "split"), os.path.join(work, "straight")
    start = time.perf_counter()
    first = _train(base + [f"checkpoint.save={split}", f"train.exit_interval={n}"])
    second = _train(base + [f"checkpoint.save={split}"])
    whole = _train(base + [f"checkpoint.save={straight}"])
    seconds = time.perf_counter() - start
    resumed = {i: second.losses[i] for i in range(n + 1, n + m + 1)}
    reference = {i: whole.losses[i] for i in range(n + 1, n + m + 1)}
    a, b = _checkpoint_tensors(split), _checkpoint_tensors(straight)
    differ = sorted(k for k in b if k not in a or not _bitwise_equal(a[k], b[k]))
    ok = (first.iteration == n and second.resumed_from == n and second.iteration == n + m
          and resumed == reference and not differ and set(a) == set(b))
    detail = (f"resumed at {second.resumed_from}; losses {n + 1}..{n + m} "
              f"{'equal' if resumed == reference else f'differ: {resumed} vs {reference}'}; "
              f"{len(b)} checkpoint tensors, {len(differ)} differ" + (f" (first: {differ[0]})" if differ else ""))
    return dict(name=f"train {n} + save + resume {m} vs straight {n + m} (bitwise)", ok=ok,
                seconds=seconds, detail=detail, checkpoint=split, losses=dict(whole.losses))


def _bitwise_equal(x, y) -> bool:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.is_floating_point:
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return torch.equal(x.contiguous().view(as_int), y.contiguous().view(as_int))
    return torch.equal(x, y)


def check_export(checkpoint: str, work: str) -> dict:
    """``python -m ckpt_convert.to_hf --verify`` in a CPU subprocess (fp32 logits vs ours)."""
    out = os.path.join(work, "hf")
    env = dict(os.environ, LONGCAT_FORCE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckpt_convert.to_hf", "--load", checkpoint,
                           "--output", out, "--verify", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "verify" in ln]
    detail = lines[-1].strip() if lines else (proc.stdout + proc.stderr).strip()[-400:]
    ok = proc.returncode == 0 and "verify OK" in detail
    return dict(name="export to HF + verify logits (CPU, fp32)", ok=ok, seconds=seconds, detail=detail)


# ---- 3. the training wrapper as training builds it: replica-free invariants ------------------------
# DDP bucket size (parameters) of the overlap run: dozens of buckets for the tiny model, so that a
# parameter read outside its module's forward lands in a bucket whose all-gather is still open.
BUCKET_PARAMS = 4096
# Overlaps on vs off at world size 1 differ only in the bucket layout (the order in which the grad
# norm is summed): equal bitwise on CPU (measured with the overlap bug patched out); the tolerance
# leaves room for bf16 kernels without a deterministic variant on CUDA, far below what a wrong or
# stale parameter or gradient does to the loss within a few steps.
LOSS_RTOL = 1e-3


def _error_line(e: BaseException) -> str:
    """``Type at file:line `code`: message``, at the innermost frame (and the innermost one of
    this repository when that is another)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(ROOT)]
    where = [f for f in (frames[-1:] + ours[-1:]) if f]
    where = where[:1] if len(where) == 2 and where[0] is where[1] else where
    message = str(e).splitlines()[0][:300] if str(e) else ""
    return (f"{type(e).__name__} at "
            + " from ".join(f"{os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`" for f in where)
            + (f": {message}" if message else ""))


def _short(names, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _patterns(names) -> str:
    """Parameter names grouped by their pattern (layer / expert indices as ``*``), with counts."""

    groups: dict = {}
    for name in names:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", re.sub(r"^(module\.)+", "", name))
        groups[pattern] = groups.get(pattern, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in sorted(groups.items()))


def _first_reads_mode():
    """A ``TorchFunctionMode`` that notes, for each watched parameter, whether the forward first
    reads it while its bucket's parameter all-gather is still open (dispatched and not waited for,
    or not dispatched at all): on DP > 1 that read sees the previous step's values. Metadata
    (shape, strides, storage) is not a read."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    metadata = {"__hash__", "size", "dim", "stride", "data_ptr", "storage_offset", "untyped_storage",
                "is_contiguous", "element_size", "numel", "__len__", "__repr__", "__format__"}
    data_attributes = {"T", "mT", "H", "mH", "data", "real", "imag"}

    class FirstReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.watched, self.seen, self.early, self.reads, self.forward = {}, set(), {}, 0, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", "")
                reads = name in data_attributes
            else:
                reads = name not in metadata
            if reads and self.watched:
                for leaf in tree_leaves((args, kwargs)):
                    key = id(leaf)
                    if isinstance(leaf, torch.Tensor) and key in self.watched and key not in self.seen:
                        self.seen.add(key)
                        self.reads += 1
                        param_name, group = self.watched[key]
                        if group.param_gather_handle is not None or not group.param_gather_dispatched:
                            self.early.setdefault(param_name, self.forward)
            return func(*args, **kwargs)

    return FirstReads()


class WrapperProbe:
    """Checks on the model and optimizer that ``loop.train`` builds, at init (inside
    ``build_optimizer``, before any step) and after the run; the parameter reads of every forward."""

    def __init__(self, cfg, bf16: bool):
        self.cfg, self.bf16 = cfg, bf16
        self.init: dict = {}
        self.after: dict = {}
        self.steps = 0
        self.optimizer = None
        self.buckets = 0
        self.reads = _first_reads_mode()

    # -- wiring ----------------------------------------------------------------------------------
    def at_init(self, chunks: list, optimizer) -> None:
        self.optimizer = optimizer
        self.init = dict(routing=self.routing_state(chunks), rotary=self.rotary(chunks),
                         main_params=self.main_params(optimizer, after_steps=False),
                         experts=self.experts_distinct(chunks))
        for chunk in chunks:
            names = {id(p): n for n, p in chunk.named_parameters()}
            groups = getattr(chunk, "param_to_bucket_group", {})
            self.buckets += len(getattr(chunk, "bucket_groups", [])) + len(
                getattr(chunk, "expert_parallel_bucket_groups", []))
            self.reads.watched.update({id(p): (names.get(id(p), "?"), g) for p, g in groups.items()})
            chunk.forward = self._tracked(chunk.forward)
        step = optimizer.step

        def counted_step(*args, **kwargs):
            out = step(*args, **kwargs)
            self.steps += 1
            return out

        optimizer.step = counted_step

    def _tracked(self, forward):
        def tracked(*args, **kwargs):
            self.reads.forward += 1
            self.reads.seen = set()
            with self.reads:
                return forward(*args, **kwargs)
        return tracked

    # -- invariants -------------------------------------------------------------------------------
    @staticmethod
    def _modules(chunks: list):
        from longcat_megatron.training.setup import unwrap

        for chunk in chunks:
            yield from unwrap(chunk).named_modules()

    def routing_state(self, chunks: list) -> dict:
        """Every tensor a module keeps in full precision (``full_precision_names``: router weight,
        expert bias, step statistics, controller state) is not 16-bit after the bf16 cast; the
        router weight is fp32; the rest of the model is bf16 (the cast really happened)."""
        import torch

        from longcat_megatron.model.full_precision import full_precision_state
        from longcat_megatron.training.setup import unwrap

        kept, bad, routers = {}, [], 0
        for chunk in chunks:
            for name, tensor in full_precision_state(unwrap(chunk)).items():
                kind = re.sub(r"\.\d+(?=\.|$)", ".*", name).split(".")[-2:]
                kept.setdefault(".".join(kind), set()).add(str(tensor.dtype).replace("torch.", ""))
                if tensor.dtype in (torch.bfloat16, torch.float16):
                    bad.append(name)
        for name, module in self._modules(chunks):
            if type(module).__name__ == "ZeroExpertRouter":
                routers += 1
                if module.weight.dtype != torch.float32:
                    bad.append(f"{name}.weight ({module.weight.dtype})")
        params = [p for chunk in chunks for p in chunk.parameters()]
        low = sum(p.dtype == torch.bfloat16 for p in params)
        ok = not bad and routers > 0 and (low > 0 or not self.bf16)
        detail = (f"{routers} routers; " + "; ".join(f"{k} {'/'.join(sorted(v))}" for k, v in sorted(kept.items()))
                  + f"; {low}/{len(params)} parameters bf16")
        if bad:
            detail = f"16-bit: {_short(bad)}; " + detail
        return dict(ok=ok, detail=detail)

    def rotary(self, chunks: list) -> dict:
        """``InterleavedRotary.inv_freq`` is fp32 and equals ``inverse_frequencies`` bitwise; cos/sin
        at positions up to ``max_position_embeddings`` are those of fp32 angles: within 4 fp32 ulps
        of the largest angle of the exact (fp64) cos/sin of the same frequencies (a bf16
        ``inv_freq`` is off by ~2^-9 of the angle)."""
        import torch

        from longcat_megatron.model.rotary import InterleavedRotary, inverse_frequencies, rotary_amplitude

        model_cfg = self.cfg.model
        reference = inverse_frequencies(model_cfg)
        amplitude = rotary_amplitude(model_cfg)
        found, problems, worst, limit = 0, [], 0.0, 0.0
        device = next(chunks[0].parameters()).device       # where the model computes its cos/sin
        for name, module in self._modules(chunks):
            if not isinstance(module, InterleavedRotary):
                continue
            found += 1
            inv = module.inv_freq
            if inv.dtype != torch.float32:
                problems.append(f"{name or 'rotary'}.inv_freq is {str(inv.dtype).replace('torch.', '')}")
            elif not torch.equal(inv.detach().cpu(), reference):
                problems.append(f"{name or 'rotary'}.inv_freq differs from inverse_frequencies")
            positions = torch.arange(model_cfg.max_position_embeddings, device=device)[None]
            cos, sin = module.angles(positions, torch.float32)
            exact = positions[0].double().cpu()[:, None] * reference.double()
            limit = float(exact.abs().max()) * 2.0 ** -22 * amplitude + 1e-6
            for got, want in ((cos, exact.cos()), (sin, exact.sin())):
                worst = max(worst, float((got.detach().double().cpu()[:, 0, 0] - want * amplitude).abs().max()))
        if worst > limit:
            problems.append(f"cos/sin off by {worst:.1e} (limit {limit:.1e}: not fp32 angles)")
        return dict(ok=found > 0 and not problems,
                    detail=(_short(problems) + "; " if problems else "")
                    + f"{found} rotary modules, cos/sin max error {worst:.1e} (limit {limit:.1e})")

    @staticmethod
    def main_params(optimizer, after_steps: bool) -> dict:
        """The distributed optimizer's main parameters (the fp32 shards it steps) and, after
        steps, its Adam moments are fp32."""
        import torch
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        inner = getattr(optimizer, "chained_optimizers", [optimizer])
        kinds = sorted({type(o).__name__ for o in inner})
        params = [p for o in inner for g in o.optimizer.param_groups for p in g["params"]]
        states = [t for o in inner for p in params for t in o.optimizer.state.get(p, {}).values()
                  if torch.is_tensor(t) and t.dtype.is_floating_point and t.dim() > 0]
        wrong = sum(p.dtype != torch.float32 for p in params) + sum(t.dtype != torch.float32 for t in states)
        ok = (all(isinstance(o, DistributedOptimizer) for o in inner) and params and not wrong
              and (states or not after_steps))
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        return dict(ok=bool(ok), detail=f"{'/'.join(kinds)}: {len(params)} main params {'/'.join(dtypes)}"
                    + (f", {len(states)} Adam moments" if after_steps else "")
                    + (f", {wrong} not fp32" if wrong else ""))

    def experts_distinct(self, chunks: list) -> dict:
        """Per MoE layer and weight kind, the local experts' weights differ pairwise at init."""
        import torch

        from longcat_megatron.model.experts import local_expert_weights

        layers, same = 0, []
        for name, module in self._modules(chunks):
            weights = local_expert_weights(module)
            if weights is None:
                continue
            layers += 1
            kinds = {"linear_fc1.weight": weights[0], "linear_fc2.weight": weights[1]}
            for kind, weights in kinds.items():
                for i in range(len(weights)):
                    for j in range(i + 1, len(weights)):
                        if torch.equal(weights[i], weights[j]):
                            same.append(f"{name}: {kind} of experts {i} and {j}")
        return dict(ok=layers > 0 and not same,
                    detail=(f"equal: {_short(same, 2)}; " if same else "") + f"{layers} expert layers")

    def finish(self, chunks: list) -> None:
        self.after = dict(routing=self.routing_state(chunks),
                          main_params=self.main_params(self.optimizer, after_steps=True))


def check_wrapper(size: dict, bf16: bool, reference: Optional[dict]) -> list:
    """The tiny run of step 1 with both overlaps on and small DDP buckets, built by ``loop.train``
    itself (``build_model``: Float16Module + DDP, ``build_optimizer``: distributed optimizer), and
    the replica-free invariants of that wrapper; losses against the same run with both overlaps off
    (``reference``: step 1's straight run, else run here)."""
    from longcat_megatron import runtime
    from longcat_megatron.training import loop

    n = size["steps"] + size["more"]
    start = time.perf_counter()
    if reference is None:
        reference = dict(_train(_train_overrides(size, bf16)).losses)
    overrides = _train_overrides(size, bf16) + ["parallel.overlap_grad_reduce=true",
                                                "parallel.overlap_param_gather=true"]
    build_optimizer = loop.build_optimizer
    losses, error, probe = {}, None, None
    from longcat_megatron.config import load_config

    cfg = load_config(TINY_CONFIG, overrides + [f"parallel.ddp_bucket_size={BUCKET_PARAMS}"])
    probe = WrapperProbe(cfg, bf16)

    def probed_build_optimizer(run_cfg, chunks):
        optimizer = build_optimizer(run_cfg, chunks)
        probe.at_init(chunks, optimizer)
        return optimizer

    loop.build_optimizer = probed_build_optimizer
    try:
        result = loop.train(cfg)
        losses = dict(result.losses)
        probe.finish(result.model_chunks)
    except Exception as e:  # noqa: BLE001 - reported as a row, the other checks still run
        error = _error_line(e)
    finally:
        loop.build_optimizer = build_optimizer
        runtime.shutdown()
    seconds = time.perf_counter() - start
    where = f"{probe.buckets} DDP bucket groups of <= {BUCKET_PARAMS} params"
    rows = []

    def row(name, ok, detail):
        rows.append(dict(name=name, ok=bool(ok), detail=detail, seconds=0.0))

    def both(key, name):
        checks = [c for c in (probe.init.get(key), probe.after.get(key)) if c]
        if not checks:
            row(name, False, "not checked: " + (error or "the run did not build"))
            return
        detail = f"at init: {checks[0]['detail']}; after the run: " + (
            "not reached" if len(checks) == 1 else
            "the same" if checks[1]["detail"] == checks[0]["detail"] else checks[1]["detail"])
        row(name, all(c["ok"] for c in checks), detail)

    both("routing", "bf16 Float16Module: routing state keeps fp32/fp64 (full_precision.py)")
    init = probe.init
    row("RoPE inv_freq fp32, cos/sin from fp32 angles", init.get("rotary", {}).get("ok"),
        init.get("rotary", {}).get("detail", "not checked: " + str(error)))
    both("main_params", "distributed optimizer: main params (and Adam moments) fp32")
    row("local experts pairwise distinct at init", init.get("experts", {}).get("ok"),
        init.get("experts", {}).get("detail", "not checked: " + str(error)))
    early = probe.reads.early
    row("overlap_param_gather: every parameter's all-gather done before the forward reads it",
        probe.reads.reads > 0 and not early,
        (f"read with the gather open: {_patterns(early)}; " if early else "")
        + f"{len(probe.reads.watched)} parameters, {probe.reads.forward} forwards watched; {where}")
    row(f"{n} steps with overlap_grad_reduce + overlap_param_gather", error is None and probe.steps == n,
        (f"stopped after {probe.steps} steps: {error}" if error else f"{probe.steps} steps; {where}"))
    if losses and len(losses) == len(reference):
        worst = max(abs(losses[i] - reference[i]) / abs(reference[i]) for i in reference)
        differ = [i for i in sorted(reference) if losses[i] != reference[i]]
        row("losses with both overlaps == both off", worst <= LOSS_RTOL,
            f"max relative difference {worst:.1e} over {len(reference)} steps (tolerance {LOSS_RTOL:.0e}); "
            + (f"first differs at step {differ[0]}" if differ else "bitwise equal"))
    else:
        row("losses with both overlaps == both off", False,
            f"not compared: the overlap run gave {len(losses)} of {len(reference)} losses")
    rows[0]["seconds"] = seconds
    return rows


# ---- 4. one Lite-width shortcut layer ---------------------------------------------------------------
def lite_layer_config(size: dict, cpu: bool):
    """configs/longcat_flash_lite.yaml's model with one layer and the FFN experts scaled down
    (at --cpu: tiny widths with the same structure)."""
    import dataclasses

    from longcat_megatron.config import load_config

    cfg = load_config(LITE_CONFIG, ["data.mock=true"]).model
    changes = dict(num_layers=1, ngram=None, num_experts=size["experts"],
                   zero_expert_num=size["zero_experts"], mtp_num_layers=0,
                   budget_target_ffn_experts=None, max_position_embeddings=max(size["seq"], 4096))
    if cpu:
        changes.update(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, moe_ffn_hidden_size=32,
                       q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16, moe_router_topk=4, vocab_size=1024)
    return dataclasses.replace(cfg, **changes)


def layer_flops(cfg, seq: int, ffn_picks: float) -> float:
    """Forward FLOPs of one shortcut layer over ``seq`` tokens (2 per multiply-add); causal
    attention counts the (s+1)/2 keys a query sees on average; experts by the routed FFN picks."""
    h, heads, s = cfg.hidden_size, cfg.num_attention_heads, seq
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    mla_proj = (h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + v) + heads * v * h)
    core = heads * (qk + v) * (s + 1) / 2
    dense = 3 * h * cfg.ffn_hidden_size
    router = h * (cfg.num_experts + cfg.zero_expert_num)
    expert = 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    return 2 * (s * (2 * (mla_proj + core + dense) + router) + ffn_picks * expert)


def bench_layers(size: dict, cpu: bool, bf16: bool) -> list:
    """The layer bench at the asked sequence; after an out-of-memory, once more at half of it (so
    the table still has a number, next to the failed row)."""
    rows = [bench_layer(size, cpu, bf16)]
    if "out of memory" in rows[0].get("detail", "") and size["seq"] >= 2048:
        import torch

        torch.cuda.empty_cache()
        rows.append(bench_layer(dict(size, seq=size["seq"] // 2), cpu, bf16))
        rows[-1]["ok"] = True  # informative; the failed row above already fails the check
    return rows


def bench_layer(size: dict, cpu: bool, bf16: bool) -> dict:
    """Step time, peak memory and TFLOP/s of one shortcut layer's forward + backward."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.layer import ShortcutLayer
    from longcat_megatron.model.rotary import InterleavedRotary

    cfg = lite_layer_config(size, cpu)
    seq = size["seq"]
    runtime.initialize(num_experts=cfg.num_experts, seed=1234)
    dev = runtime.device()
    tf = transformer_config(cfg, bf16=bf16)
    tf.perform_initialization = False  # initialised below on the device (CPU init of 0.6B is slow)
    layer = ShortcutLayer(cfg, tf, 0).to(dev).train()
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, cfg.init_method_std, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name or "layernorm" in name else 0.0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rotary = InterleavedRotary(cfg).angles(torch.arange(seq, device=dev)[None], dtype)
    x = torch.randn(seq, 1, cfg.hidden_size, device=dev, dtype=dtype, generator=gen).requires_grad_()
    router = layer.mlp.router
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        y = layer(x, rotary)
        y.float().square().mean().backward()

    row = dict(name=f"Lite-width shortcut layer, seq {seq}, mbs 1, fwd+bwd", ok=True,
               hidden=cfg.hidden_size, heads=cfg.num_attention_heads, experts=cfg.num_experts,
               zero_experts=cfg.zero_expert_num, topk=cfg.moe_router_topk, seq=seq,
               params=sum(p.numel() for p in layer.parameters()))
    try:
        for _ in range(size["warmup"]):
            step()
        sync()
        router.step_picks.zero_()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(size["iters"]):
            step()
        sync()
        ms = (time.perf_counter() - start) / size["iters"] * 1e3
    except torch.cuda.OutOfMemoryError as e:  # reported, not hidden: the table says where it stopped
        row.update(ok=False, detail=f"out of memory: {str(e).splitlines()[0]}")
        del layer, x
        return row
    finally:
        runtime.shutdown()
    picks = float(router.step_picks[: cfg.num_experts].sum()) / size["iters"]
    flops = 3 * layer_flops(cfg, seq, picks)  # backward = 2 x forward
    row.update(step_ms=ms, ffn_experts_per_token=picks / seq, tflops=flops / (ms / 1e3) / 1e12,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    row["detail"] = (f"{ms:.1f} ms/step, {row['tflops']:.1f} TFLOP/s, "
                     + (f"peak {row['peak_gib']:.2f} GiB, " if row["peak_gib"] is not None else "")
                     + f"{row['ffn_experts_per_token']:.2f} FFN experts/token")
    return row


# ---- 7. deterministic mode: bitwise runs, no SDC false alarm, the layer's speed cost ------------------
def check_determinism(size: dict, cpu: bool, bf16: bool, layer_rows: list) -> list:
    """Two runs with ``train.deterministic`` + the SDC replay every step bitwise equal and clean;
    the layer bench in deterministic mode against the default one."""
    import torch

    from longcat_megatron.training import determinism

    overrides = _train_overrides(size, bf16) + ["train.deterministic=true", "train.sdc_check_interval=1",
                                                "train.rerun_mode=validate_results"]
    t0 = time.perf_counter()
    try:
        a, b = _train(overrides), _train(overrides)
    finally:
        torch.use_deterministic_algorithms(False)
    ok = a.exit_code == b.exit_code == 0 and a.losses == b.losses and a.grad_norms == b.grad_norms
    rows = [dict(name=f"train.deterministic: two {size['steps'] + size['more']}-step runs bitwise, SDC replay "
                      "every step", ok=ok, seconds=time.perf_counter() - t0,
                 detail=f"exit {a.exit_code}/{b.exit_code} ({a.stop_reason or 'no fault reported'}); losses "
                        f"{'equal' if a.losses == b.losses else 'differ'}, grad norms "
                        f"{'equal' if a.grad_norms == b.grad_norms else 'differ'}")]
    base = next((r for r in layer_rows if r.get("step_ms")), None)
    determinism.configure(True)
    try:
        row = bench_layer(size, cpu, bf16)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    row["name"] = "deterministic mode: Lite-width shortcut layer (speed cost)"
    if row.get("step_ms") and base:
        row["detail"] += f"; default mode {base['step_ms']:.1f} ms/step ({row['step_ms'] / base['step_ms'] - 1:+.1%})"
    rows.append(row)
    return rows


# ---- 5. packed documents: DocumentMask vs dense mask -----------------------------------------------
def check_documents(size: dict, cpu: bool, bf16: bool) -> dict:
    """One MLA block over packed documents: DocumentMask == its dense mask (output, input grad)."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.attention import LongcatMLA, document_attention_path
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.rotary import InterleavedRotary

    cfg, seq = lite_layer_config(size, cpu), size["seq"]
    runtime.initialize(num_experts=cfg.num_experts, seed=1234)
    dev = runtime.device()
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        mla = LongcatMLA(cfg, transformer_config(cfg, bf16=bf16)).to(dev, dtype).train()
        path, _ = document_attention_path(torch.zeros(1, 1, 1, cfg.qk_head_dim, device=dev, dtype=dtype),
                                          max(cfg.qk_head_dim, cfg.v_head_dim), 0.0, cfg.attention_backend)
        gen = torch.Generator().manual_seed(0)
        cuts = sorted(torch.randperm(seq - 1, generator=gen)[:7].add(1).tolist())  # 8 documents
        documents = DocumentMask.from_starts([[0] + cuts], seq)
        rotary = InterleavedRotary(cfg).angles(torch.arange(seq, device=dev)[None], dtype)
        x = torch.randn(seq, 1, cfg.hidden_size, generator=gen).to(dev, dtype).requires_grad_()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        results = {}
        # the dense mask is built after the documents run, so that run's peak does not hold it
        for name, make_mask in (("documents", lambda: documents), ("dense", lambda: documents.dense(dev))):
            mask = make_mask()
            for _ in range(2):                              # the second call is timed
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                x.grad = None
                sync()
                start = time.perf_counter()
                out = mla(x, rotary, mask)
                out.float().square().mean().backward()
                sync()
            results[name] = (out.detach().float(), x.grad.float().clone(),
                             (time.perf_counter() - start) * 1e3,
                             torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    finally:
        runtime.shutdown()
    (out, grad, ms, peak), (ref_out, ref_grad, ref_ms, ref_peak) = results["documents"], results["dense"]
    err = max(float((out - ref_out).abs().max() / ref_out.abs().max()),
              float((grad - ref_grad).abs().max() / ref_grad.abs().max()))
    tol = 2e-2 if bf16 else 1e-5
    peaks = f", peak {peak:.2f} vs {ref_peak:.2f} GiB" if peak is not None else ""
    return dict(name=f"packed documents (8) in one MLA block, seq {seq}: DocumentMask == dense mask",
                ok=err <= tol, detail=f"max rel. error {err:.1e} (tolerance {tol:.0e}); "
                f"{ms:.1f} vs {ref_ms:.1f} ms fwd+bwd{peaks}; DocumentMask path: {path}")


# ---- 6. per-document attention: one varlen call vs one SDPA call per document piece ----------------
def sft_pack(seq: int, conversations: int, samples: int = 1, seed: int = 0):
    """A ``DocumentMask`` of ``samples`` x ``seq`` tokens, each sample ``conversations`` documents
    of random lengths (random cut points; each sample its own layout)."""
    import torch

    from longcat_megatron.model.document_mask import DocumentMask

    gen = torch.Generator().manual_seed(seed)
    starts = [[0] + sorted(torch.randperm(seq - 1, generator=gen)[:conversations - 1].add(1).tolist())
              for _ in range(samples)]
    return DocumentMask.from_starts(starts, seq)


def _relative(got: list, want: list) -> float:
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
               for g, w in zip(got, want))


def check_varlen(size: dict, cpu: bool, bf16: bool) -> list:
    """torch's flash varlen kernel (``LongcatMLA``'s CUDA path for a ``DocumentMask``) against the
    per-piece SDPA path on an SFT-like pack: the dispatch on this device; outputs and gradients of
    the core attention (one sample, two samples with their own layouts, and the two query chunks of
    each rank of an emulated CP=2) and of a Lite-width MLA block; kernel calls; step times. On CPU
    (``--cpu``) the kernel is ``attention.varlen_reference`` (same contract, SDPA per segment)."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import attention
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.rotary import InterleavedRotary

    cfg, seq, conversations = lite_layer_config(size, cpu), size["seq"], size["conversations"]
    runtime.initialize(num_experts=cfg.num_experts, seed=1234)
    dev = runtime.device()
    dtype = torch.bfloat16 if bf16 else torch.float32
    tol = 2e-2 if bf16 else 1e-5
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    try:
        mla = attention.LongcatMLA(cfg, transformer_config(cfg, bf16=bf16)).to(dev, dtype).train()
        heads, d, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
        probe = torch.zeros(1, 1, heads, d, device=dev, dtype=dtype)
        path, why = attention.document_attention_path(probe, max(d, dv), 0.0, cfg.attention_backend)
        want = "pieces" if dev.type != "cuda" else "varlen"
        rows.append(dict(name=f"per-document attention on {dev.type}, {str(dtype).replace('torch.', '')}, "
                         f"head dims {d}/{dv}: dispatch", ok=path == want,
                         detail=f"auto takes {path}" + (f" ({why})" if why else "")
                         + ("" if path == want else f"; expected {want}")))
        real = attention.varlen_reference if dev.type != "cuda" else attention.varlen_kernel()
        if real is None:
            rows.append(dict(name="varlen vs per-piece attention", ok=False,
                             detail=f"torch {torch.__version__} has no torch.nn.attention.varlen"))
            return rows
        calls = []

        def kernel(*args, **kwargs):
            calls.append(int(args[0].shape[0]))
            return real(*args, **kwargs)

        def run(mode, fn):
            with attention.document_attention(mode, kernel=kernel if mode == "varlen" else None):
                return fn()

        gen = torch.Generator(device=dev).manual_seed(1)

        def leaf(*shape):
            return torch.randn(*shape, device=dev, dtype=dtype, generator=gen).requires_grad_()

        def core(q, k, v, documents, chunks, grad):
            def fn():
                for t in (q, k, v):
                    t.grad = None
                out = mla._document_attention(q, k, v, documents, chunks)
                out.backward(grad)
                return [out.detach(), q.grad, k.grad, v.grad]
            return fn

        # core attention: one pack; two samples with their own layouts; CP=2 query chunks
        errors, call_counts = {}, {}
        one = sft_pack(seq, conversations)
        cases = {"b=1": (1, one), "b=2": (2, sft_pack(seq, conversations, samples=2, seed=1))}
        for name, (b, documents) in cases.items():
            q, k, v = leaf(seq, b, heads, d), leaf(seq, b, heads, d), leaf(seq, b, heads, dv)
            grad = torch.randn(seq, b, heads * dv, device=dev, dtype=dtype, generator=gen)
            fn = core(q, k, v, documents, [(0, 0, seq)], grad)
            ref = [t.clone() for t in run("pieces", fn)]
            calls.clear()
            errors[name] = _relative(run("varlen", fn), ref)
            call_counts[name] = len(calls)
        c = seq // 4
        k, v = leaf(seq, 1, heads, d), leaf(seq, 1, heads, dv)
        for rank in (0, 1):
            q = leaf(2 * c, 1, heads, d)
            grad = torch.randn(2 * c, 1, heads * dv, device=dev, dtype=dtype, generator=gen)
            fn = core(q, k, v, one, [(rank * c, 0, c), ((3 - rank) * c, c, c)], grad)
            ref = [t.clone() for t in run("pieces", fn)]
            calls.clear()
            errors[f"CP2 rank {rank}"] = _relative(run("varlen", fn), ref)
            call_counts[f"CP2 rank {rank}"] = len(calls)
        calls_ok = call_counts["b=1"] == call_counts["b=2"] == 1 and all(
            call_counts[f"CP2 rank {r}"] == 2 for r in (0, 1))
        rows.append(dict(name=f"varlen == per-piece core attention ({conversations} conversations in {seq} "
                         "tokens; b=2; CP=2 query chunks)", ok=max(errors.values()) <= tol and calls_ok,
                         detail="max rel. error (output, dq, dk, dv) " + ", ".join(
                             f"{k_} {e:.1e}" for k_, e in errors.items()) + f" (tolerance {tol:.0e}); "
                         "kernel calls " + ", ".join(f"{k_} {n}" for k_, n in call_counts.items())))

        # timings: the core attention of the pack and the whole MLA block, fwd + bwd
        q, k, v = leaf(seq, 1, heads, d), leaf(seq, 1, heads, d), leaf(seq, 1, heads, dv)
        grad = torch.randn(seq, 1, heads * dv, device=dev, dtype=dtype, generator=gen)
        x = torch.randn(seq, 1, cfg.hidden_size, device=dev, dtype=dtype, generator=gen).requires_grad_()
        rotary = InterleavedRotary(cfg).angles(torch.arange(seq, device=dev)[None], dtype)
        block_grad = torch.randn(seq, 1, cfg.hidden_size, device=dev, dtype=dtype, generator=gen)

        def block():
            x.grad = None
            mla.zero_grad(set_to_none=True)
            out = mla(x, rotary, one)
            out.backward(block_grad)
            return [out.detach(), x.grad] + [p.grad for p in mla.parameters()]

        def timed(mode, fn):
            times = []
            for i in range(size["warmup"] + size["iters"]):
                sync()
                start = time.perf_counter()
                result = run(mode, fn)
                sync()
                if i >= size["warmup"]:
                    times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[len(times) // 2], result

        ms = {}
        for mode in ("pieces", "varlen"):
            ms["core", mode], _ = timed(mode, core(q, k, v, one, [(0, 0, seq)], grad))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms["block", mode], result = timed(mode, block)
            ms["peak", mode] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
            ms["result", mode] = [t.clone() for t in result]
        err = _relative(ms["result", "varlen"], ms["result", "pieces"])
        peaks = (f"; peak {ms['peak', 'pieces']:.2f} vs {ms['peak', 'varlen']:.2f} GiB"
                 if ms["peak", "pieces"] is not None else "")
        rows.append(dict(
            name=f"varlen vs per-piece: Lite-width MLA block, seq {seq}, {conversations} conversations, fwd+bwd",
            ok=err <= tol, pieces_ms=ms["block", "pieces"], varlen_ms=ms["block", "varlen"],
            detail=f"max rel. error (output, input and weight grads) {err:.1e} (tolerance {tol:.0e}); "
                   f"block {ms['block', 'pieces']:.1f} -> {ms['block', 'varlen']:.1f} ms, core attention "
                   f"{ms['core', 'pieces']:.1f} -> {ms['core', 'varlen']:.1f} ms "
                   f"({ms['core', 'pieces'] / max(ms['core', 'varlen'], 1e-9):.1f}x){peaks}"))
    finally:
        runtime.shutdown()
    return rows


# ---- report -----------------------------------------------------------------------------------------
def environment_line() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informative only
            nccl = "?"
        return (f"GPU {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
    return f"CPU only, torch {torch.__version__}"


def render(rows: list, env: str, total_s: float) -> str:
    lines = [f"Environment: {env}. Whole check: {total_s:.0f} s.", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'PASS' if r['ok'] else 'FAIL'} | {r.get('seconds', 0):.1f} | {r['detail']} |")
    layers = [r for r in rows if "step_ms" in r]
    if layers:
        lines += ["", "| hidden | heads | FFN + zero experts | top-k | seq | layer params | step ms | "
                  "peak GiB | TFLOP/s | FFN experts/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        lines += [f"| {layer['hidden']} | {layer['heads']} | {layer['experts']} + {layer['zero_experts']} | "
                  f"{layer['topk']} | {layer['seq']} | {layer['params'] / 1e9:.2f}B | {layer['step_ms']:.1f} | "
                  + (f"{layer['peak_gib']:.2f}" if layer["peak_gib"] is not None else "-")
                  + f" | {layer['tflops']:.1f} | {layer['ffn_experts_per_token']:.2f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU with gloo (what CI runs)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16")
    parser.add_argument("--experts", type=int, default=None, help="FFN experts of the layer bench")
    parser.add_argument("--seq", type=int, default=None, help="sequence length of the layer bench")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    parser.add_argument("--out", default=None, help="also write gpu_check.md / gpu_check.json here")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not args.cpu:
        ensure_dependencies()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    if args.cpu:
        os.environ["LONGCAT_FORCE_CPU"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "2")
    else:
        # Bitwise resume needs deterministic kernels; cuBLAS needs this set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; this check uses the machine's own torch (with CUDA)",
              file=sys.stderr)
        return 2

    from longcat_megatron import runtime

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu for the CPU variant", file=sys.stderr)
        return 2
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(runtime.free_port())
    runtime.silence_known_warnings()
    size = dict(SIZES["cpu" if args.cpu else "gpu"])
    size.update({k: v for k, v in (("experts", args.experts), ("seq", args.seq)) if v})
    bf16 = not args.fp32
    rows, start = [], time.perf_counter()

    def write(final: bool) -> str:
        """The table so far; with --out also as files (rewritten after every step, so that a run
        cut short by a time limit still leaves the steps it finished)."""
        table = render([{k: v for k, v in r.items() if k not in ("checkpoint", "losses")} for r in rows],
                       environment_line(), time.perf_counter() - start)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            open(os.path.join(args.out, "gpu_check.md"), "w").write(
                table + ("\n" if final else "\n\n(incomplete: the run stopped before its last step)\n"))
            json.dump(dict(environment=environment_line(), complete=final, seconds=time.perf_counter() - start,
                           rows=[{k: v for k, v in r.items() if k not in ("checkpoint", "losses")} for r in rows]),
                      open(os.path.join(args.out, "gpu_check.json"), "w"), indent=1)
        return table

    def step(name: str, fn) -> list:
        """Run one step; a crash becomes a FAIL row (the other steps still run)."""
        if name in args.skip:
            return []
        t0 = time.perf_counter()
        try:
            new = fn()
        except Exception as e:  # noqa: BLE001 - one row per crashed step, with where it happened
            new = [dict(name=f"{name}: crashed", ok=False, detail=_error_line(e))]
            traceback.print_exc()
            try:
                runtime.shutdown()
            except Exception:  # noqa: BLE001 - best effort before the next step
                pass
            torch.use_deterministic_algorithms(False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if new and "seconds" not in new[0]:
            new[0]["seconds"] = time.perf_counter() - t0
        rows.extend(new)
        print(f"gpu_check: {name} done in {time.perf_counter() - t0:.0f} s: "
              + "; ".join(f"{r['name']}: {'PASS' if r['ok'] else 'FAIL'}" for r in new), flush=True)
        write(final=False)
        return new

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or tmp

        def train_step():
            if not args.cpu:
                torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row = check_resume(work, size, bf16)
            finally:
                torch.use_deterministic_algorithms(False)
            nondeterministic = sorted({str(w.message).split(" does not have a deterministic")[0]
                                       for w in caught if "deterministic" in str(w.message)})
            if nondeterministic:  # the ops to look at first when the bitwise comparison fails
                row["detail"] += "; ops without a deterministic CUDA kernel: " + ", ".join(nondeterministic)
            return [row]

        def wrapper_step():
            if not args.cpu:   # as the reference run: its losses are compared
                torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return check_wrapper(size, bf16, trained[0].get("losses") if trained else None)
            finally:
                torch.use_deterministic_algorithms(False)

        def layer_step():
            t0 = time.perf_counter()
            layer_rows = bench_layers(size, args.cpu, bf16)
            for r in layer_rows:
                r["seconds"] = (time.perf_counter() - t0) / len(layer_rows)
            return layer_rows

        trained = step("train", train_step)
        if trained:
            checkpoint = trained[0].get("checkpoint")
            step("export", lambda: [check_export(checkpoint, work) if checkpoint else dict(
                name="export to HF + verify logits (CPU, fp32)", ok=False,
                detail="not run: the train step left no checkpoint")])
        step("wrapper", wrapper_step)
        layered = step("layer", layer_step)
        step("documents", lambda: [check_documents(size, args.cpu, bf16)])
        step("varlen", lambda: check_varlen(size, args.cpu, bf16))
        step("determinism", lambda: check_determinism(size, args.cpu, bf16, layered))
    table = write(final=True)
    print(table, flush=True)
    if not args.cpu and not args.no_docs:
        from bench.report import append_section

        print("appended to " + append_section(
            "GPU check (bench/gpu_check.py: NCCL world size 1, bf16)",
            f"Command: `python bench/gpu_check.py`\n\n{table}"))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
