"""Run a test function on N gloo processes.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh processes with torchrun-style
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), calls
``fn(*args)`` in each and returns the list of their return values (index = rank). If any rank raises,
the others are killed and the failing rank's traceback is raised in the test as
:class:`DistributedTestError`; a run that exceeds ``timeout`` is killed and reported with the ranks
that had not finished. ``fn`` must be a module-level function (it is pickled by name).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable


class DistributedTestError(AssertionError):
    """A rank failed or the run timed out; the message holds the rank's traceback."""


from longcat_megatron.runtime import free_port  # noqa: E402,F401 (re-exported)


def _worker(rank: int, world: int, port: int, env: dict, fn: Callable, args: tuple, out) -> None:
    # The fork server's environment is the one it started with: take the test's, as spawn would.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        # The heavy imports, then gc.freeze(): megatron calls gc.collect() at every optimizer
        # checkpoint, which otherwise walks the whole import-time heap (~0.4 s a call here).
        import gc

        import longcat_megatron.training.loop  # noqa: F401

        gc.freeze()
        # Plain pickle (tensors inline), not torch's shared-memory reductions: the child may exit
        # before the parent reads the queue.
        result = pickle.dumps(fn(*args))
        out.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything, incl. CheckpointException
        out.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from longcat_megatron import runtime

            runtime.shutdown()
        except Exception:  # noqa: BLE001
            pass


_CHILD_DEFAULTS = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
_PRELOAD = [
    "torch", "megatron.core.parallel_state", "megatron.core.models.gpt", "megatron.core.optimizer",
    "megatron.core.distributed", "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing",
    "longcat_megatron.runtime", "longcat_megatron.training.loop", "longcat_megatron.training.setup",
    "longcat_megatron.training.checkpointing", "longcat_megatron.model.longcat",
]


def _context():
    """A fork server that has imported torch, megatron-core and the training loop once.

    Each rank is forked from it (~0.1 s) instead of spawned and re-importing them (~2 s a rank;
    hundreds of ranks a CI run). The server starts with the child defaults in its environment, since
    torch and megatron read some variables at import; each rank then takes the test's environment.
    """
    ctx = mp.get_context("forkserver")
    if not getattr(_context, "started", False):
        saved = {k: os.environ.get(k) for k in _CHILD_DEFAULTS}
        os.environ.update(_CHILD_DEFAULTS)
        try:
            ctx.set_forkserver_preload(_PRELOAD)
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _context.started = True
    return ctx


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, env: dict | None = None
) -> list:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return per-rank results or raise."""
    ctx = _context()
    out = ctx.Queue()
    port = free_port()
    child_env = dict(os.environ)
    child_env.update(_CHILD_DEFAULTS)
    child_env.update(env or {})
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, child_env, fn, args, out), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    error = None
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                error = f"timed out after {timeout:.0f}s; ranks {missing} had not finished"
                break
            try:
                rank, status, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    time.sleep(0.5)  # give a dying rank's report time to arrive
                    try:
                        rank, status, payload = out.get_nowait()
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        error = f"ranks exited without reporting (exit codes {codes})"
                        break
                else:
                    continue
            if status == "error":
                error = f"rank {rank} of {world_size} failed:\n{payload}"
                break
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if error is not None:
        raise DistributedTestError(f"{getattr(fn, '__name__', fn)}: {error}")
    return [results[r] for r in range(world_size)]
