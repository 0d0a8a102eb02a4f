"""Run a function on N local gloo/NCCL processes, or directly when already launched (torchrun/SLURM)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable


from longcat_megatron.runtime import free_port  # noqa: E402,F401 (re-exported)


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Conversion is CPU work: gloo groups, whatever GPUs the host has (NCCL would bind rank r to GPU r
    # and fail when there are more ranks than GPUs).
    os.environ.setdefault("LONGCAT_FORCE_CPU", "1")
    try:
        out.put((rank, "ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - report to the parent
        from ckpt_convert import ConversionError

        msg = str(e) if isinstance(e, ConversionError) else traceback.format_exc()
        out.put((rank, "error", msg))
    finally:
        try:
            from longcat_megatron import runtime

            runtime.shutdown()
        except Exception:  # noqa: BLE001
            pass


def launch(fn: Callable, world: int, *args: Any) -> list:
    """``fn(*args)`` on ``world`` ranks; per-rank results. Raises ConversionError with the first
    failing rank's message. Inside an existing launch (``WORLD_SIZE`` set) runs ``fn`` directly."""
    from ckpt_convert import ConversionError

    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ConversionError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the layout "
                                  f"needs {world} processes")
        return [fn(*args)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    error = None
    try:
        while len(results) < world and error is None:
            try:
                rank, status, payload = out.get(timeout=5.0)
            except Exception:  # noqa: BLE001 - queue.Empty: check for dead ranks
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    error = f"rank(s) {dead} exited without reporting"
                continue
            if status == "error":
                error = f"rank {rank}: {payload}"
            else:
                results[rank] = payload
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.kill()
            p.join()
    if error is not None:
        raise ConversionError(error)
    return [results[r] for r in range(world)]
