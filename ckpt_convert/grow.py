"""Model-growth initialization: turn a committed checkpoint of an n-layer model into a k·n-layer one.

    python -m ckpt_convert.grow --load HALF --save FULL --factor 2 [--order stack|interleave]
    python -m ckpt_convert.grow ... --dry-run          # every check, nothing written
    python -m ckpt_convert.grow --overrides-of DIR     # what a run of DIR's checkpoint must set

LongCat-Flash trained a 14-layer half-scale model and stacked it into 28 layers, keeping the
optimizer and schedule state (docs/operations.md, "Model growth"). Target layer ``j`` of the grown
model is a copy of source layer

* ``stack`` (LongCat's): ``j mod n``  -> layers 0..n-1, then 0..n-1 again, ...
* ``interleave``:        ``j div k``  -> 0,0,1,1,... for k = 2

Everything stored under a layer's key (``decoder.layers.N.``: weights, the expert bias, the budget
controller's state, megatron's ``_extra_state``; ``optimizer.state.{param,exp_avg,exp_avg_sq}.
decoder.layers.N.``: the fp32 main copy and Adam moments of megatron's ``fully_reshardable``
format; megatron's own stacked layers, ``decoder.layers.*`` with the layer as leading axis, slice by
slice) is copied with its layer; everything else (embeddings, N-gram tables, MTP, final norm, head
and their optimizer state) once. ``common.pt`` (iteration, LR scheduler, consumed samples, data
fingerprint, schedule, param groups) is the source's, plus ``extra.grown_from``; only
``run_config.yaml``'s ``model.num_layers`` (and, when given, the pipeline layout) changes. One
process, no process group, one block of one tensor in memory per worker thread; the tensors are
written by from_hf's writing path (:mod:`ckpt_convert.dcp_writer`), so the result is an ordinary
torch_dist checkpoint with checksums and a tracker that loads at any parallel layout.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ckpt_convert import ConversionError, default_workers

ORDERS = ("stack", "interleave")
# A key stored under one decoder layer: the model's, its optimizer state's, megatron's objects'
# (``..._extra_state/shard_E_N``). Layer numbers are global (megatron renumbers them under PP).
LAYER_KEY = re.compile(r"^(?P<pre>(?:optimizer\.state\.\w+\.)?decoder\.layers\.)(?P<layer>\d+)"
                       r"(?P<rest>[./].*)$")
# megatron's own TransformerBlock (model.arch=gpt) stores its layers stacked instead: one key per
# layer tensor with the (global) layer as the leading axis, ``decoder.layers.mlp.linear_fc1.weight``
# [L, ...]; its objects carry the layer as the first offset/shape of the shard name
# (``..._extra_state/shard_3_28``, ``shard_3.5_28.64`` for experts).
STACKED_KEY = re.compile(r"^(?:optimizer\.state\.\w+\.)?decoder\.layers\.(?!\d+[./])")
SHARD_NAME = re.compile(r"^(?P<key>.+)/shard_(?P<offset>\d+(?:\.\d+)*)_(?P<shape>\d+(?:\.\d+)*)$")
BLOCK_BYTES = 256 * 2**20  # tensors are copied in blocks of rows of at most about this size
GROW_EXTRA = "grown_from"  # the key of common.pt's ``extra`` that records the growth


def source_layer(target: int, n: int, factor: int, order: str) -> int:
    """The source layer that target layer ``target`` of the ``factor``·``n``-layer model copies."""
    if order == "stack":
        return target % n
    if order == "interleave":
        return target // factor
    raise ConversionError(f"--order {order!r}: use one of {list(ORDERS)}")


def target_layers(source: int, n: int, factor: int, order: str) -> list[int]:
    """The target layers that copy source layer ``source`` (``factor`` of them)."""
    return [j for j in range(n * factor) if source_layer(j, n, factor, order) == source]


@dataclass
class GrowPlan:
    """What a growth reads and writes; built by :func:`plan_growth` after every check."""

    source: str          # the committed iteration directory grown
    iteration: int
    save: str
    replace_empty: bool  # --save is an existing empty directory
    num_layers: int      # n
    factor: int
    order: str
    run_cfg: object      # the grown RunConfig (run_config.yaml)
    common: dict         # the grown common.pt

    @property
    def grown_layers(self) -> int:
        return self.num_layers * self.factor

    def overrides(self) -> list[str]:
        """What the grown run sets (its config's layer count must match the checkpoint)."""
        return [f"model.num_layers={self.grown_layers}"]


# ----------------------------------------------------------------------------------------- checks
def committed_source(load: str, iteration: Optional[int] = None) -> tuple[str, int]:
    """``(iteration directory, iteration)`` of a committed checkpoint of the run directory ``load``
    (the tracker names it, or an earlier complete one with ``iteration``); anything else raises."""
    from ckpt_convert.dcp_reader import TRACKER, resolve_checkpoint_dir
    from longcat_megatron.training.checkpoint_integrity import MANIFEST, is_complete

    if not os.path.isdir(load):
        raise ConversionError(f"--load '{load}' does not exist")
    if os.path.isfile(os.path.join(load, "metadata.json")):
        raise ConversionError(
            f"--load '{load}' is an iteration directory; pass the run's checkpoint directory (the one "
            f"holding {TRACKER}): only a committed checkpoint can be grown")
    if not os.path.isfile(os.path.join(load, TRACKER)):
        raise ConversionError(
            f"--load '{load}' holds no committed checkpoint (no {TRACKER}: its save never finished, or "
            "this is not a training checkpoint directory); grow a run's committed checkpoint")
    path, latest = resolve_checkpoint_dir(load)
    if iteration is not None and iteration != latest:
        if iteration > latest:
            raise ConversionError(f"--iteration {iteration} of '{load}' is not committed (the tracker "
                                  f"names {latest}); grow {latest} or an earlier iteration")
        path, latest = resolve_checkpoint_dir(load, iteration)
    if not is_complete(path):
        raise ConversionError(f"'{path}' is not a complete checkpoint (no {MANIFEST}, no "
                              "run_config.yaml); grow a committed checkpoint of a training run")
    return path, latest


def check_target(save: str) -> bool:
    """``--save`` must not exist or be an empty directory (then True); a directory holding anything,
    above all checkpoints, is refused (a growth never writes over a checkpoint)."""
    from ckpt_convert.dcp_reader import TRACKER, list_iterations

    if not os.path.exists(save):
        return False
    if not os.path.isdir(save):
        raise ConversionError(f"--save '{save}' exists and is not a directory")
    held = list_iterations(save)
    if held or os.path.exists(os.path.join(save, TRACKER)):
        raise ConversionError(
            f"--save '{save}' holds checkpoints (iterations {held or 'none'}"
            f"{', ' + TRACKER if os.path.exists(os.path.join(save, TRACKER)) else ''}); a growth never "
            "writes over checkpoints: choose a new directory")
    if os.listdir(save):
        raise ConversionError(f"--save '{save}' is not empty; choose a new (or empty) directory")
    return True


def _grown_config(path: str, factor: int, pipeline: Optional[int], virtual_pipeline: Optional[int]):
    """The source's run_config.yaml with ``model.num_layers`` ×factor (and the pipeline layout
    given), checked like a training config's layout; returns (source layers, grown RunConfig)."""
    import dataclasses

    import yaml

    from ckpt_convert.saved_config import RUN_CONFIG
    from longcat_megatron.config import ConfigError, RunConfig, build_section, validate_pipeline

    where = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(where):
        raise ConversionError(f"'{where}' is missing: the growth needs the run config saved with the "
                              "checkpoint (the model shape)")
    try:
        cfg = build_section(RunConfig, yaml.safe_load(open(where)) or {}, "")
    except (ConfigError, yaml.YAMLError) as e:
        raise ConversionError(f"{where}: {e}") from None
    n = cfg.model.num_layers
    par = cfg.parallel
    if pipeline is not None:
        par = dataclasses.replace(par, pipeline=pipeline,
                                  virtual_pipeline=virtual_pipeline if pipeline > 1 else None)
    elif virtual_pipeline is not None:
        par = dataclasses.replace(par, virtual_pipeline=virtual_pipeline)
    grown = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=n * factor),
                                parallel=par)
    try:
        validate_pipeline(grown.model, grown.parallel)
    except ConfigError as e:
        raise ConversionError(
            f"--factor {factor} gives {n} x {factor} = {n * factor} layers, which the pipeline layout "
            f"does not take: {e}. Choose a factor (or --pipeline / --virtual-pipeline) for which every "
            "pipeline stage holds the same number of layers") from None
    return n, grown


def _stacked_object(key: str):
    """``(key, offsets, shape)`` of a stacked-layer object's shard name, else None."""
    m = SHARD_NAME.match(key) if STACKED_KEY.match(key) else None
    if m is None:
        return None
    return m["key"], [int(x) for x in m["offset"].split(".")], [int(x) for x in m["shape"].split(".")]


def _layer_keys(reader, n: int, path: str) -> None:
    """The checkpoint's layer keys (per layer or stacked) number exactly the layers 0..n-1 of its
    run_config.yaml."""
    layers = {int(m["layer"]) for key in list(reader.tensors) + reader.objects()
              if (m := LAYER_KEY.match(key))}
    depths = {info.shape[0] if info.shape else 0 for key, info in reader.tensors.items()
              if STACKED_KEY.match(key)}
    depths |= {obj[2][0] for key in reader.objects() if (obj := _stacked_object(key))}
    problem = None
    if not layers and not depths:
        problem = "no decoder layers"
    elif layers and layers != set(range(n)):
        problem = f"decoder layers {min(layers)}..{max(layers)} ({len(layers)} layers)"
    elif depths and depths != {n}:
        problem = f"decoder layers stacked {sorted(depths)} deep"
    if problem:
        raise ConversionError(f"'{path}' holds {problem} but its run_config.yaml says "
                              f"model.num_layers={n}: the checkpoint and its config disagree")


def plan_growth(load: str, save: str, factor: int = 2, order: str = "stack", *,
                iteration: Optional[int] = None, pipeline: Optional[int] = None,
                virtual_pipeline: Optional[int] = None, verify: bool = True) -> GrowPlan:
    """Every check of a growth, nothing written; raises :class:`ConversionError` on bad input."""
    import torch

    from ckpt_convert.dcp_reader import TorchDistReader
    from longcat_megatron.training.checkpoint_integrity import verify_checkpoint

    if order not in ORDERS:
        raise ConversionError(f"--order {order!r}: use one of {list(ORDERS)}")
    if factor < 2:
        raise ConversionError(f"--factor {factor}: a growth multiplies the layer count by 2 or more")
    for name, value in (("--pipeline", pipeline), ("--virtual-pipeline", virtual_pipeline)):
        if value is not None and value < 1:
            raise ConversionError(f"{name} {value} must be >= 1")
    replace_empty = check_target(save)
    path, it = committed_source(load, iteration)
    n, run_cfg = _grown_config(path, factor, pipeline, virtual_pipeline)
    common_path = os.path.join(path, "common.pt")
    try:
        common = torch.load(common_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise ConversionError(f"cannot read {common_path}: {e}") from None
    fmt = common.get("optimizer_format")
    if "optimizer" in common and fmt != "fully_reshardable":
        raise ConversionError(
            f"'{path}' holds its optimizer state in the {fmt!r} format (checkpoint.fully_reshardable="
            "false): its flat per-rank buffers cannot be split by layer. Resume that run for one step "
            "with checkpoint.fully_reshardable=true (the default) and grow the new checkpoint")
    _layer_keys(TorchDistReader(path), n, path)
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise ConversionError(f"checkpoint {path} is damaged: " + "; ".join(problems)
                                  + ". Nothing was written; grow an intact checkpoint")
    common = dict(common)
    common["extra"] = {**(common.get("extra") or {}), GROW_EXTRA: {
        "source": os.path.abspath(path), "iteration": it, "factor": factor, "order": order,
        "num_layers": [n, n * factor]}}
    return GrowPlan(path, it, save, replace_empty, n, factor, order, run_cfg, common)


# ----------------------------------------------------------------------------------------- write
def _blocks(shape: tuple, element_size: int):
    """``(offsets, sizes)`` regions covering a tensor of ``shape`` in blocks of whole rows (dim 0)
    of about :data:`BLOCK_BYTES` each (one region for a scalar or a small tensor)."""
    if not shape:
        yield (), ()
        return
    row = element_size
    for s in shape[1:]:
        row *= s
    step = max(1, BLOCK_BYTES // max(row, 1))
    for lo in range(0, shape[0], step):
        yield (lo,) + (0,) * (len(shape) - 1), (min(step, shape[0] - lo),) + tuple(shape[1:])


def _copies(key: str, shape: tuple, element_size: int, plan: GrowPlan):
    """How tensor ``key`` (of ``shape``) is grown: ``(source offsets, sizes, grown shape,
    [(grown key, grown offsets), ...])`` per block read (each block read once, written per copy)."""
    m = LAYER_KEY.match(key)
    if m is not None:
        targets = [f"{m['pre']}{j}{m['rest']}"
                   for j in target_layers(int(m["layer"]), plan.num_layers, plan.factor, plan.order)]
        for offsets, sizes in _blocks(shape, element_size):
            yield offsets, sizes, shape, [(t, offsets) for t in targets]
    elif STACKED_KEY.match(key):
        grown = (plan.grown_layers,) + tuple(shape[1:])
        for i in range(plan.num_layers):
            for offsets, sizes in _blocks(tuple(shape[1:]), element_size):
                yield ((i,) + offsets, (1,) + sizes, grown,
                       [(key, (j,) + offsets)
                        for j in target_layers(i, plan.num_layers, plan.factor, plan.order)])
    else:
        for offsets, sizes in _blocks(shape, element_size):
            yield offsets, sizes, shape, [(key, offsets)]


def _object_targets(key: str, plan: GrowPlan) -> list[str]:
    """The names object ``key`` (megatron's ``_extra_state`` of a layer, RNG states ...) is stored
    under in the grown checkpoint."""
    m = LAYER_KEY.match(key)
    if m is not None:
        return [f"{m['pre']}{j}{m['rest']}"
                for j in target_layers(int(m["layer"]), plan.num_layers, plan.factor, plan.order)]
    stacked = _stacked_object(key)
    if stacked is None:
        return [key]
    name, offsets, shape = stacked
    rest = "".join(f".{x}" for x in offsets[1:]), "".join(f".{x}" for x in shape[1:])
    return [f"{name}/shard_{j}{rest[0]}_{plan.grown_layers}{rest[1]}"
            for j in target_layers(offsets[0], plan.num_layers, plan.factor, plan.order)]


def write_grown(plan: GrowPlan, out_root: str, workers: int = 1, progress=None) -> int:
    """Write the grown checkpoint of ``plan`` into ``out_root`` (``iter_N`` + tracker); returns the
    number of tensors written (stacked layers count once)."""
    import shutil

    import torch

    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.dcp_writer import DCPWriter, commit_checkpoint, run_tasks

    reader = TorchDistReader(plan.source)
    out_iter = os.path.join(out_root, f"iter_{plan.iteration:07d}")
    os.makedirs(out_iter)
    writer = DCPWriter(out_iter, progress=progress)

    def copy(key, offsets, sizes, grown_shape, targets):
        block = reader.read_region(key, offsets, sizes)  # read once, written to every copy
        for target, at in targets:
            writer.add_chunk(target, grown_shape, at, block)

    tasks = []
    for key, info in reader.tensors.items():
        element_size = torch.empty((), dtype=info.dtype).element_size()
        for piece in _copies(key, info.shape, element_size, plan):
            tasks.append(lambda k=key, p=piece: copy(k, *p))
    try:
        run_tasks(tasks, workers)
        for key in reader.objects():
            data = reader.read_bytes(key)
            for target in _object_targets(key, plan):
                writer.add_bytes(target, data)
        writer.finish(planner_data=reader.metadata.planner_data)
    finally:
        writer.close()
    shutil.copy(os.path.join(plan.source, "metadata.json"), os.path.join(out_iter, "metadata.json"))
    torch.save(plan.common, os.path.join(out_iter, "common.pt"))
    commit_checkpoint(out_root, plan.iteration, plan.run_cfg)
    return len(writer.tensor_keys())


def grow(load: str, save: str, factor: int = 2, order: str = "stack", *,
         iteration: Optional[int] = None, pipeline: Optional[int] = None,
         virtual_pipeline: Optional[int] = None, verify: bool = True, workers: Optional[int] = None,
         progress: bool = False) -> dict:
    """Grow the committed checkpoint of ``load`` into ``save``; returns a summary. Raises
    :class:`ConversionError` on bad input, before anything is written (output appears only whole)."""
    from tqdm import tqdm

    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.output_dir import atomic_output_dir

    start = time.perf_counter()
    plan = plan_growth(load, save, factor, order, iteration=iteration, pipeline=pipeline,
                       virtual_pipeline=virtual_pipeline, verify=verify)
    reader = TorchDistReader(plan.source)
    nbytes = sum(info.nbytes * (plan.factor if LAYER_KEY.match(k) or STACKED_KEY.match(k) else 1)
                 for k, info in reader.tensors.items())
    timings: dict = {}
    with atomic_output_dir(save, overwrite=plan.replace_empty, timings=timings) as tmp:
        with tqdm(total=nbytes, unit="B", unit_scale=True, desc="grow", disable=not progress,
                  file=sys.stderr) as bar:
            tensors = write_grown(plan, tmp, workers or default_workers(), bar)
    return {"plan": plan, "tensors": tensors, "bytes": nbytes, "output": os.path.abspath(save),
            "seconds": time.perf_counter() - start, "flush_seconds": timings["flush_seconds"]}


def overrides_of(root: str) -> list[str]:
    """What a run starting from (or resuming) the committed checkpoint of ``root`` must set: its
    layer count (the launcher's GROW_FROM sets it on every start of a grown stage)."""
    from ckpt_convert.saved_config import load_model_config

    path, _ = committed_source(root)
    return [f"model.num_layers={load_model_config(path).num_layers}"]


def _describe(plan: GrowPlan) -> str:
    order = {"stack": "layers 0..n-1 repeated", "interleave": "each layer repeated in place"}[plan.order]
    return (f"{plan.source} (iteration {plan.iteration}): {plan.num_layers} -> {plan.grown_layers} "
            f"layers, --order {plan.order} ({order}); optimizer, schedule and data position kept")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ckpt_convert.grow",
        description="Model-growth initialization: grow a committed n-layer training checkpoint into a "
                    "factor*n-layer one (weights, Adam moments, expert bias and budget-controller "
                    "state copied with each layer; iteration, LR schedule and data position kept). "
                    "Prints on stdout the overrides the grown run needs.")
    p.add_argument("--load", help="run checkpoint directory holding a committed checkpoint (the tracker)")
    p.add_argument("--save", help="new (or empty) directory for the grown checkpoint")
    p.add_argument("--factor", type=int, default=2, help="layer-count multiplier k (default 2)")
    p.add_argument("--order", choices=ORDERS, default="stack",
                   help="stack (default, LongCat's): layers 0..n-1 then 0..n-1 again; "
                        "interleave: 0,0,1,1,...")
    p.add_argument("--iteration", type=int, default=None,
                   help="grow this committed iteration instead of the tracker's")
    p.add_argument("--pipeline", type=int, default=None,
                   help="pipeline-parallel size the grown run will use (checked against the grown "
                        "layer count and recorded in run_config.yaml; default: the source's)")
    p.add_argument("--virtual-pipeline", type=int, default=None, help="virtual pipeline size, likewise")
    p.add_argument("--workers", type=int, default=None,
                   help="threads copying tensor blocks (default: CPU count, at most 8)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the source's files against its checksums.json")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (except the checksums) and print the plan; write nothing")
    p.add_argument("--overrides-of", metavar="DIR",
                   help="print the overrides a run of the committed checkpoint in DIR needs, and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.overrides_of:
            print("\n".join(overrides_of(args.overrides_of)))
            return 0
        if not args.load or not args.save:
            raise ConversionError("--load and --save are required (or --overrides-of DIR)")
        if args.dry_run:
            plan = plan_growth(args.load, args.save, args.factor, args.order, iteration=args.iteration,
                               pipeline=args.pipeline, virtual_pipeline=args.virtual_pipeline,
                               verify=False)
            print(f"[grow] would grow {_describe(plan)}; into {os.path.abspath(args.save)}", file=sys.stderr)
        else:
            s = grow(args.load, args.save, args.factor, args.order, iteration=args.iteration,
                     pipeline=args.pipeline, virtual_pipeline=args.virtual_pipeline,
                     verify=not args.no_verify, workers=args.workers, progress=not args.no_progress)
            plan = s["plan"]
            print(f"[grow] grew {_describe(plan)}; {s['tensors']} tensors, {s['bytes'] / 1e9:.3f} GB "
                  f"into {s['output']} in {s['seconds']:.1f}s (flushed in {s['flush_seconds']:.2f}s). "
                  f"Train it with checkpoint.load={s['output']} and model.num_layers={plan.grown_layers}",
                  file=sys.stderr)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan.overrides()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
