"""Silent-data-corruption (SDC) detection: a step that a faulty GPU computed wrongly.

Two detectors, both ending the run with exit 78 (:data:`EXIT_SDC`) when they find a fault, after
naming the rank and host in the log, in ``CHECKPOINT_DIR/sdc.jsonl`` (one JSON line per suspect
rank) and in ``$LONGCAT_SDC_FILE`` (set by launch/common.sh, which requeues the job without the
suspect nodes). No checkpoint is written at a detection: what the suspect node computed since the
last committed checkpoint is not trusted, and the requeued job resumes from that checkpoint.

1. ``train.rerun_mode: validate_results`` wires megatron-core's rerun state machine
   (``megatron.core.rerun_state_machine``) into the loop: every loss is validated (finite?); a
   rejected loss makes every rank re-run the whole step in place (data, RNG and the model's per-step
   statistics rewound). A re-run that does not reproduce the rejected result is a transient hardware
   fault on the rank that saw it (exit 78). A reproduced one is numerics, not hardware: the step goes
   on to the stability guard (training/stability.py), which skips the update and counts it.
   Megatron's own continuation of the reproducible case (checkpoint, exit 17, re-run on another GPU,
   exit 16) is not used: with deterministic kernels a reproduced non-finite loss is the model's, and
   the stability guard already handles those. ``report_determinism_stats`` re-runs every step and
   logs how much the two runs differ (megatron's statistics), without acting on it.
2. ``train.sdc_check_interval: N`` (needs ``train.deterministic``): every N iterations, before the
   optimizer step, micro-batch 0 is replayed through the forward (megatron's forward-only schedule,
   so every layout works) and a fingerprint of every module's output (the sum of its bits: any single
   flipped bit changes it) is compared with the step's own forward of that micro-batch. A difference
   on a rank makes it a suspect. The replay costs one micro-batch forward per N iterations and
   nothing on other steps (the hooks exist only during a checked step).

Limits, for the operator: the replay compares the forward; a fault in the backward or the optimizer
step is seen only through its effect on a later checked forward (the replica check,
``train.check_replicas_interval``, catches a diverged data-parallel replica). Under tensor or
expert parallelism a corrupted activation reaches the other ranks of the group before the
comparison, so all of them are reported; they usually share the node. The first iteration after a
start is not validated (megatron's rule: no checkpoint could hold it yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist

from longcat_megatron import collectives

EXIT_SDC = 78
RECORD_FILE = "sdc.jsonl"


def describe(cfg) -> str:
    """The determinism and SDC settings, for ``--dry-run``."""
    from longcat_megatron.training import determinism

    t = cfg.train
    modes = {
        "disabled": "rerun state machine: disabled (a non-finite loss goes straight to the stability guard)",
        "validate_results": ("rerun state machine: validate_results (a non-finite loss re-runs the step; "
                             f"not reproduced = hardware fault, exit {EXIT_SDC}; reproduced = stability guard)"),
        "report_determinism_stats": ("rerun state machine: report_determinism_stats (every step runs "
                                     "twice; the log reports the differences)"),
    }
    check = (f"every {t.sdc_check_interval} iteration(s): replay micro-batch 0's forward, compare every "
             f"module output bitwise; a difference = exit {EXIT_SDC}" if t.sdc_check_interval else "off")
    return "\n".join([
        "  determinism and silent-data-corruption detection:",
        f"    {determinism.describe(t.deterministic)}",
        f"    {modes[t.rerun_mode]}",
        f"    replay check: {check}",
        f"    on exit {EXIT_SDC} the SLURM launcher requeues the job without the suspect node(s) "
        "(MAX_SDC_REQUEUES, default 3)",
    ])


# ---- megatron's rerun state machine, made safe for CPU/gloo ----------------------------------------
def _rerun_machine_class():
    from megatron.core import rerun_state_machine as rsm

    class RerunStateMachine(rsm.RerunStateMachine):
        """megatron's state machine with its three CUDA-only spots made device-neutral: the flag
        all-reduce (a CUDA tensor; here the collective rule of longcat_megatron.collectives), the CUDA
        RNG state (only when CUDA is there) and the device index in its log lines."""

        def _reduce_any(self, value):
            flags = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.int32)
            if dist.is_initialized():
                collectives.all_reduce(flags, op=dist.ReduceOp.MAX)
            out = tuple(bool(x) for x in flags.tolist())
            return out if isinstance(value, list) else out[0]

        def _save_state(self):
            with _cuda_shim():
                super()._save_state()

        def _restore_state(self):
            with _cuda_shim():
                super()._restore_state()

        def validate_result(self, *args, **kwargs):
            with _cuda_shim():
                return super().validate_result(*args, **kwargs)

    return RerunStateMachine


@contextlib.contextmanager
def _cuda_shim():
    """Without CUDA: ``torch.cuda.current_device`` answers -1 and the CUDA RNG state is an empty
    tensor, for megatron code that asks for them only to log or save them."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.set_rng_state
    torch.cuda.current_device = lambda: -1
    torch.cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.set_rng_state = saved


class _FirstBatch:
    """An iterator that remembers the first item it yields after :meth:`arm` (micro-batch 0)."""

    def __init__(self, iterable):
        self.iterable = iterable
        self.armed = False
        self.first = None

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterable)
        if self.armed:
            self.first, self.armed = item, False
        return item

    def arm(self) -> None:
        self.armed, self.first = True, None


# ---- fingerprints of module outputs ------------------------------------------------------------------
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensors(value, depth: int = 0):
    if torch.is_tensor(value):
        yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name), depth + 1)


def bit_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s elements read as integers of their width (int64, on ``t``'s device): any
    single flipped bit changes it."""
    t = t.detach()
    if t.is_floating_point():
        t = t.contiguous().view(_INT_VIEW[t.element_size()])
    return t.sum(dtype=torch.int64)


class _Fingerprints:
    """Forward hooks on every module of the model chunks recording each output's :func:`bit_sum`,
    for the first forward of each chunk since :meth:`start` (micro-batch 0); not in a backward's
    recompute."""

    def __init__(self, model_chunks: list):
        self.chunks = model_chunks
        self.handles = []
        self.records: list = []
        self.names: list = []
        self.recording: list = []

    def start(self) -> None:
        self.records = [[] for _ in self.chunks]
        self.names = [[] for _ in self.chunks]
        self.recording = [True] * len(self.chunks)
        if self.handles:
            return
        for c, chunk in enumerate(self.chunks):
            for name, module in chunk.named_modules():
                self.handles.append(module.register_forward_hook(self._hook(c, name or "<chunk>", module is chunk)))

    def _hook(self, c: int, name: str, is_root: bool) -> Callable:
        def hook(module, args, output):
            if not self.recording[c] or torch._C._current_graph_task_id() != -1:
                return
            for t in _tensors(output):
                self.records[c].append(bit_sum(t))
                self.names[c].append(name)
            if is_root:
                self.recording[c] = False  # the chunk's first forward is done
        return hook

    def take(self) -> tuple:
        """(names, one int64 CPU tensor of the recorded sums) of what was recorded since start."""
        names = [n for per_chunk in self.names for n in per_chunk]
        sums = [s for per_chunk in self.records for s in per_chunk]
        return names, (torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64))

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- the loop's side -------------------------------------------------------------------------------------
_ACTIVE: list = [None]


def validate_loss(loss: torch.Tensor) -> None:
    """Hand one micro-batch's loss to the rerun state machine (from the loss function); no-op when
    the rerun mode is disabled."""
    guard = _ACTIVE[0]
    if guard is not None and guard.machine is not None and guard.in_step:
        guard.validate(loss)


class SdcGuard:
    """Runs a training step's forward/backward under the rerun state machine and the replay check,
    and says whether a hardware fault was found (see the module docstring)."""

    def __init__(self, cfg, model_chunks: list, save_dir: Optional[str], rank: int, log: Callable):
        from megatron.core import rerun_state_machine as rsm
        from megatron.core import tensor_parallel

        t = cfg.train
        self.model, self.rank, self.log, self.save_dir = model_chunks, rank, log, save_dir
        self.interval = t.sdc_check_interval
        self.mode = t.rerun_mode
        self.machine = None
        rsm.destroy_rerun_state_machine()
        machine = _rerun_machine_class()(
            state_save_func=self._save_model_state,
            state_restore_func=self._restore_model_state,
            mode=rsm.RerunMode(self.mode),
        )
        rsm._set_rerun_state_machine(machine)  # megatron's DDP validates through the same singleton
        if self.mode != "disabled":
            self.machine = machine
        self._tracker = tensor_parallel.get_cuda_rng_tracker
        self.fingerprints = _Fingerprints(model_chunks) if self.interval else None
        self._rejected = False
        self._reproduced = False
        self.in_step = False  # inside a training step's forward/backward (not evaluation or replay)
        self.first_batches: list = []
        _ACTIVE[0] = self

    # the state a re-run must rewind besides data and RNG: the model's buffers (per-step router
    # statistics, expert bias) and megatron's tensor-parallel RNG streams (dropout)
    def _buffers(self) -> list:
        # nn.Module's method: megatron's DDP wrapper has an attribute of that name (its grad buffers)
        return [b for m in self.model for b in torch.nn.Module.buffers(m)]

    def _save_model_state(self):
        buffers = [b.detach().clone() for b in self._buffers()]
        return {"buffers": buffers, "rng_tracker": self._tracker().get_states()}

    def _restore_model_state(self, state) -> None:
        with torch.no_grad():
            for b, saved in zip(self._buffers(), state["buffers"]):
                b.copy_(saved)
        self._tracker().set_states(state["rng_tracker"])

    def wrap(self, iterators: list):
        """The data iterator argument for megatron's schedule: each chunk's iterator wrapped for
        the replay check and the rerun state machine (unchanged when both are off)."""
        from megatron.core.rerun_state_machine import RerunDataIterator

        if self.interval:
            self.first_batches = [_FirstBatch(it) for it in iterators]
            iterators = self.first_batches
        if self.machine is not None:
            iterators = [RerunDataIterator(it) for it in iterators]
        return iterators[0] if len(iterators) == 1 else list(iterators)

    def validate(self, loss: torch.Tensor) -> None:
        def reject(result) -> bool:
            bad = not bool(torch.isfinite(result).all())
            self._rejected = self._rejected or bad
            return bad

        def compare(initial, rerun) -> float:
            same = bool(torch.equal(initial, rerun)) or bool(torch.isnan(initial).all() and torch.isnan(rerun).all())
            self._reproduced = same
            return 0.0 if same else float("inf")

        if self.mode == "report_determinism_stats":
            self.machine.validate_result(loss.detach(), torch.isnan, "loss", tolerance=0.0, fatal=False)
        else:
            self.machine.validate_result(loss.detach().clone(), reject, "loss is NaN or Inf",
                                         comparison_func=compare, tolerance=0.0, fatal=False)

    def step(self, iteration: int, data_iterator, run: Callable, zero_grads: Callable, replay: Callable):
        """Run step ``iteration`` (1-based): ``run()`` is its forward/backward (returns megatron's
        reports), ``zero_grads()`` clears gradients before a re-run, ``replay(batches)`` runs a
        forward-only pass over one micro-batch per chunk. Returns (reports, fault description or
        None); the fault is agreed on every rank."""
        check = bool(self.interval) and iteration % self.interval == 0
        if check:
            for b in self.first_batches:
                b.arm()
            self.fingerprints.start()
        self._rejected = self._reproduced = False
        runs = 0
        self.in_step = True
        if self.machine is None:
            reports, runs = run(), 1
        else:
            while self.machine.should_run_forward_backward(data_iterator):
                if runs:
                    zero_grads()
                    self.log(f"[sdc] iteration {iteration}: a loss was not finite on some rank: re-running "
                             "the step to tell a hardware fault from numerics")
                runs += 1
                if check and runs > 1:
                    self.fingerprints.start()  # compare the replay with the final run
                reports = run()
            self.machine.should_checkpoint_and_exit()  # megatron's bookkeeping; never asks (fatal=False)
        self.in_step = False
        fault = None
        if self.mode == "validate_results" and runs > 1 and self._rejected:
            if self._reproduced:
                self.log(f"[sdc] iteration {iteration}: rank {self.rank}: the re-run reproduced the non-finite "
                         "loss bit for bit: numerics, not hardware (the stability guard handles it)")
            else:
                fault = "a non-finite loss that a re-run of the same step did not reproduce"
        if check:
            fault = fault or self._replay_check(replay)
        if not (check or (self.mode == "validate_results" and runs > 1)):
            return reports, None
        return reports, self._agree(iteration, fault)

    def _replay_check(self, replay: Callable) -> Optional[str]:
        names, sums = self.fingerprints.take()
        batches = [b.first for b in self.first_batches]
        if any(b is None for b in batches):
            self.fingerprints.stop()
            return None  # this stage read no micro-batch (cannot happen with megatron's schedules)
        buffers = self._save_model_state()
        self.fingerprints.start()
        with torch.no_grad():
            replay(batches)
        self._restore_model_state(buffers)
        replay_names, replay_sums = self.fingerprints.take()
        self.fingerprints.stop()
        if replay_names != names:
            return (f"the replayed forward ran other modules ({len(replay_names)} outputs instead of "
                    f"{len(names)})")
        differ = (replay_sums != sums).nonzero().flatten().tolist()
        if differ:
            return (f"the replayed forward of micro-batch 0 differs from the step's own forward in "
                    f"{len(differ)} of {len(names)} module outputs, first in {names[differ[0]]}")
        return None

    def _agree(self, iteration: int, fault: Optional[str]) -> Optional[str]:
        """Every rank learns which ranks found a fault; suspects record themselves. Returns the
        summary (same on every rank) or None."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        flags = torch.zeros(world, dtype=torch.int32)
        flags[self.rank] = 1 if fault else 0
        if dist.is_initialized():
            collectives.all_reduce(flags)
        suspects = flags.nonzero().flatten().tolist()
        if not suspects:
            return None
        host = socket.gethostname().split(".")[0]
        if fault:  # on the suspect's own log (rank 0 keeps the job log, the others their rank logs)
            print(f"[sdc] iteration {iteration}: SILENT DATA CORRUPTION suspected on rank {self.rank}, "
                  f"host {host}: {fault}", flush=True)
            self._record(iteration, host, fault)
        summary = (f"silent data corruption detected at iteration {iteration} on rank(s) "
                   f"{', '.join(map(str, suspects))} (hosts in {RECORD_FILE} and the rank logs); "
                   f"exit {EXIT_SDC}: the job is requeued without the suspect node(s) and resumes from "
                   "the last committed checkpoint")
        self.log(f"[sdc] {summary}")
        return summary

    def _record(self, iteration: int, host: str, fault: str) -> None:
        line = {"iteration": iteration, "rank": self.rank, "host": host, "fault": fault,
                "job": os.environ.get("SLURM_JOB_ID")}
        if self.save_dir:
            os.makedirs(self.save_dir, exist_ok=True)
            with open(os.path.join(self.save_dir, RECORD_FILE), "a") as f:
                f.write(json.dumps(line) + "\n")
        path = os.environ.get("LONGCAT_SDC_FILE")
        if path:
            with open(path, "a") as f:
                f.write(f"{iteration}\t{self.rank}\t{host}\t{' '.join(fault.split())}\n")

    def close(self) -> None:
        if self.fingerprints is not None:
            self.fingerprints.stop()
        _ACTIVE[0] = None


def read_records(save_dir: str) -> list:
    """The SDC records of a run directory (for status and tests)."""
    path = os.path.join(save_dir, RECORD_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
