"""Import a Hugging Face LongCat directory as a megatron-core checkpoint for training here.

    python -m ckpt_convert.from_hf --hf HF_DIR --save CKPT_DIR [--workers N] [--via-model --tp 1 --pp 1 --ep 1]

Default (streaming): one process, ``--workers`` threads, reads each HF tensor once and writes a
layout-free torch_dist checkpoint that loads under any TP/PP/EP. Either way the HF directory is
checked first (config vs weights, unknown keys). ``--via-model`` starts TP*PP*EP local
processes (gloo on CPU; or runs inside an existing torchrun/srun launch of that size), builds the
model at that layout, fills every rank's shards straight from the safetensors files (each rank reads
only the tensors/rows it holds, via mmap) and saves with the training loop's checkpoint writer
(``iter_0000000`` + tracker + ``run_config.yaml``, no optimizer state). Resume it with
``checkpoint.load=CKPT_DIR`` (the optimizer starts fresh). Output appears only when complete.

Both expert layouts are accepted: Meituan's per-expert keys, transformers 5.x ``save_pretrained``
output (per-expert keys plus unused zero-expert gate/up, which are skipped) and fused
``gate_up_proj``/``down_proj`` tensors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional

import torch

from ckpt_convert import ConversionError, default_workers
from ckpt_convert.hf_reader import HFCheckpointReader, routed_expert_count
from ckpt_convert.layout import NGRAM_TABLES, Rule, conversion_rules
from ckpt_convert.output_dir import atomic_output_dir

_EXPERT_HF = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight$")
_STACKED_EXPERTS = re.compile(r"^(?P<pre>.*\.experts)\.experts\.(?P<rest>.*)$")
_ALIASES = ("model.ngram_embeddings.word_embeddings.weight",)


class HFSource:
    """Full-key tensors (and checkpoint-key regions) read from an HF directory."""

    def __init__(self, reader: HFCheckpointReader, cfg):
        self.reader = reader
        self.cfg = cfg
        self.rules: dict[str, list[Rule]] = {}
        for rule in conversion_rules(cfg):
            self.rules.setdefault(rule.full, []).append(rule)

    # ------------------------------------------------------------------------------ HF tensors
    def hf_available(self, key: str) -> bool:
        if self.reader.has(key):
            return True
        m = _EXPERT_HF.match(key)
        return bool(m) and self.reader.has(f"{m['pre']}.gate_up_proj") and self.reader.has(f"{m['pre']}.down_proj")

    def hf_tensor(self, key: str) -> torch.Tensor:
        if self.reader.has(key):
            return self.reader.read(key)
        m = _EXPERT_HF.match(key)
        if m:
            gate, up, down = self.reader.expert(m["pre"], int(m["e"]), self.cfg.moe_ffn_hidden_size)
            return {"gate": gate, "up": up, "down": down}[m["p"]]
        return self.reader.read(key)  # raises the "not in checkpoint" error

    def full_tensor(self, full: str) -> torch.Tensor:
        rules = self.rules.get(full)
        if not rules:
            raise ConversionError(f"no HF source for model tensor '{full}'")
        rule = rules[0]
        if rule.kind == "gate_up":
            infos = [self.reader.tensors.get(k) for k in rule.hf]
            if all(i is not None and i.shape and i.dtype == infos[0].dtype and i.shape[1:] == infos[0].shape[1:]
                   for i in infos):
                # Read gate and up straight into their halves of fc1 (no torch.cat copy).
                out = torch.empty((sum(i.shape[0] for i in infos), *infos[0].shape[1:]), dtype=infos[0].dtype)
                row = 0
                for k, i in zip(rule.hf, infos):
                    self.reader.read_rows(k, 0, i.shape[0], out=out[row:row + i.shape[0]])
                    row += i.shape[0]
                return out
            return torch.cat([self.hf_tensor(k) for k in rule.hf], dim=0)
        if rule.kind == "rows":
            return torch.cat([self.hf_tensor(r.hf[0]) for r in rules], dim=0)
        return self.hf_tensor(rule.hf[0])

    # ----------------------------------------------------------------------- checkpoint regions
    def region(self, key: str, offsets, sizes, prepend: int) -> torch.Tensor:
        """The region of checkpoint tensor ``key`` that one rank's ShardedTensor holds."""
        if key == NGRAM_TABLES:
            return self._table_rows(offsets[0], sizes[0])[:, offsets[1]:offsets[1] + sizes[1]]
        m = _STACKED_EXPERTS.match(key)
        if m and prepend >= 1:
            parts = [self._slice(self.full_tensor(f"{m['pre']}.local_experts.{e}.{m['rest']}"),
                                 offsets[1:], sizes[1:], key)
                     for e in range(offsets[0], offsets[0] + sizes[0])]
            return torch.stack(parts)
        if prepend:
            raise ConversionError(f"checkpoint key '{key}' has {prepend} stacked axes; only stacked "
                                  "experts are supported")
        return self._slice(self.full_tensor(key), offsets, sizes, key)

    @staticmethod
    def _slice(t: torch.Tensor, offsets, sizes, key: str) -> torch.Tensor:
        if t.dim() != len(offsets):
            raise ConversionError(f"'{key}': HF tensor has shape {tuple(t.shape)}, the model expects "
                                  f"{len(offsets)} dims")
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            if o + s > t.shape[dim]:
                raise ConversionError(f"'{key}': HF tensor has shape {tuple(t.shape)}, too small for the "
                                      f"model's region {list(offsets)}+{list(sizes)}")
            t = t.narrow(dim, o, s)
        return t

    def _table_rows(self, start: int, count: int) -> torch.Tensor:
        pieces = []
        for rule in self.rules[NGRAM_TABLES]:
            lo, hi = max(start, rule.row_start), min(start + count, rule.row_start + rule.rows)
            if lo < hi:
                pieces.append(self.reader.read_rows(rule.hf[0], lo - rule.row_start, hi - rule.row_start))
        return torch.cat(pieces, dim=0)


# ------------------------------------------------------------------------------------ checks
def check_hf_dir(reader: HFCheckpointReader, cfg) -> None:
    """Config vs weights and unknown keys, before any process starts or anything is written."""
    layers = cfg.num_layers
    for layer in range(layers):
        lp = f"model.layers.{layer}"
        if not reader.has(f"{lp}.mlp.router.classifier.weight"):
            raise ConversionError(f"'{reader.path}': '{lp}.mlp.router.classifier.weight' is missing "
                                  f"(config.json says num_layers={layers})")
        n = routed_expert_count(reader, lp)
        if n != cfg.num_experts:
            raise ConversionError(
                f"'{reader.path}': config.json says n_routed_experts={cfg.num_experts} but "
                f"'{lp}.mlp.experts' holds FFN weights (down_proj) for {n} experts")
        rows = reader.tensors[f"{lp}.mlp.router.classifier.weight"].shape[0]
        if rows != cfg.num_experts + cfg.zero_expert_num:
            raise ConversionError(
                f"'{reader.path}': '{lp}.mlp.router.classifier.weight' has {rows} rows but config.json "
                f"says n_routed_experts + zero_expert_num = {cfg.num_experts + cfg.zero_expert_num}")
    if reader.has(f"model.layers.{layers}.mlp.router.classifier.weight"):
        raise ConversionError(f"'{reader.path}' holds weights for more than num_layers={layers} layers")
    source = HFSource(reader, cfg)
    used: set[str] = set(_ALIASES)
    for rules in source.rules.values():
        for rule in rules:
            for key in rule.hf:
                if not source.hf_available(key):
                    raise ConversionError(f"'{reader.path}' lacks '{key}' (config.json implies it)")
                m = _EXPERT_HF.match(key)
                used.update([key] if not m or reader.has(key)
                            else [f"{m['pre']}.gate_up_proj", f"{m['pre']}.down_proj"])
    unknown = []
    for key in reader.tensors:
        if key in used:
            continue
        m = _EXPERT_HF.match(key)
        if m and int(m["e"]) >= cfg.num_experts and m["p"] in ("gate", "up"):
            continue  # transformers 5.x zero-expert gate/up: never used
        if key.startswith("model.mtp.") and not cfg.mtp_num_layers:
            continue  # MTP weights of a config without num_nextn_predict_layers: not imported
        unknown.append(key)
    if unknown:
        raise ConversionError(f"'{reader.path}' holds {len(unknown)} tensor(s) this converter does not "
                              f"know, e.g. '{unknown[0]}' (in {reader.file_of[unknown[0]]})")


# ------------------------------------------------------------------------------------- ranks
def _fill_from_hf(model, source: HFSource) -> int:
    """Copy every ShardedTensor of ``model`` from the HF source; returns tensors filled."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def shards(x):
        if isinstance(x, ShardedTensorFactory):
            yield from shards(x.build())
        elif isinstance(x, ShardedTensor):
            yield x
        elif isinstance(x, (list, tuple)):   # a factory may build nested lists (grouped experts)
            for y in x:
                yield from shards(y)
        elif isinstance(x, dict):
            for y in nested_values(x):
                yield from shards(y)

    filled = 0
    with torch.no_grad():
        for value in nested_values(model.sharded_state_dict()):
            for sh in shards(value):
                if re.search(r"\.router\.controller\.", sh.key):
                    continue
                if sh.flattened_range is not None:
                    raise ConversionError(f"'{sh.key}': flattened shards are not supported")
                pre = sh.prepend_axis_num
                sizes = (1,) * pre + tuple(sh.local_shape)
                region = source.region(sh.key, tuple(sh.global_offset), sizes, pre)
                sh.data.copy_(region.reshape(sh.local_shape).to(sh.data.dtype))
                filled += 1
    return filled


def import_model_config(reader: HFCheckpointReader, overrides: Optional[list[str]] = None):
    """ModelConfig from config.json plus ``field=value`` overrides of training-only fields
    (budget controller, aux losses, dispatcher ...); shape fields come from the HF config only."""
    from ckpt_convert.hf_config import model_config_from_hf
    from longcat_megatron.config import ConfigError, build_section, parse_override, to_dict
    from longcat_megatron.model.config import ModelConfig

    source = os.path.join(reader.path, "config.json")
    cfg = model_config_from_hf(reader.config, source)
    if not overrides:
        return cfg
    tree = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text.removeprefix("model."))
        node = tree
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {}) if isinstance(node, dict) else node
        node[leaf] = value
    try:
        new = build_section(ModelConfig, tree, "model")
        new.validate()
    except (ConfigError, ValueError) as e:
        raise ConversionError(f"--model-override: {e}") from None
    for field in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                  "num_experts", "zero_expert_num", "moe_ffn_hidden_size", "moe_router_topk",
                  "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "mtp_num_layers", "routed_scaling_factor", "rotary_base", "rope_type", "norm_epsilon",
                  "per_layer_embedding"):
        if getattr(new, field) != getattr(cfg, field):
            raise ConversionError(f"--model-override model.{field}: it is fixed by {source} "
                                  f"({getattr(cfg, field)!r})")
    return new


def _rank_import(hf_dir: str, save_root: str, tp: int, pp: int, ep: int, run_config_tree: dict,
                 overrides: Optional[list[str]] = None) -> int:
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.config import RunConfig, build_section, save_config
    from longcat_megatron.model.factory import build_model_chunk, transformer_config
    from longcat_megatron.training.checkpointing import TrainState, save_checkpoint

    reader = HFCheckpointReader(hf_dir)
    cfg = import_model_config(reader, overrides)
    runtime.initialize(tensor=tp, pipeline=pp, expert=ep, num_experts=cfg.num_experts)
    sp = tp > 1
    tfc = transformer_config(cfg, tensor=tp, pipeline=pp, expert=ep, sequence_parallel=sp)
    model = build_model_chunk(cfg, tfc, pre_process=ps.is_pipeline_first_stage(),
                              post_process=ps.is_pipeline_last_stage())
    filled = _fill_from_hf(model, HFSource(reader, cfg))
    run_cfg = build_section(RunConfig, run_config_tree, "")
    run_cfg.model = cfg
    save_checkpoint(save_root, [model], None, None, TrainState(iteration=0),
                    config_yaml_writer=lambda path: save_config(run_cfg, path))
    return filled


# ------------------------------------------------------------------------ direct (streaming) route
SKELETON_DIMS = dict(num_attention_heads=1, ffn_hidden_size=4, moe_ffn_hidden_size=4, vocab_size=16,
                     q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                     max_position_embeddings=16, rope_type="rope")
ROW_BLOCK = 1 << 20  # N-gram sub-tables are written in blocks of this many rows


def _save_skeleton(model_tree: dict, root: str) -> bool:
    """Save a same-structure, tiny-width model with the training loop's writer (one process).

    It supplies everything of a checkpoint that is not a weight: the key set, megatron's
    ``_extra_state`` objects, common.pt, metadata.json and the budget-controller state."""
    from longcat_megatron import runtime
    from longcat_megatron.config import RunConfig, build_section, save_config
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import build_model_chunk, transformer_config
    from longcat_megatron.training.checkpointing import TrainState, save_checkpoint

    cfg = build_section(ModelConfig, model_tree, "model")
    runtime.initialize(num_experts=cfg.num_experts)
    model = build_model_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    save_checkpoint(root, [model], None, None, TrainState(iteration=0),
                    config_yaml_writer=lambda p: save_config(RunConfig(model=cfg), p))
    return True


def skeleton_tree(cfg) -> dict:
    """``cfg`` with every width shrunk (layer/expert counts, MTP and N-gram table count kept)."""
    from longcat_megatron.config import to_dict

    tree = to_dict(cfg)
    tree.update(SKELETON_DIMS)
    ng = tree.get("ngram")
    tables = ng["emb_split_num"] * (ng["emb_neighbor_num"] - 1) if ng else 1
    tree["hidden_size"] = 4 * tables
    if ng and ng.get("eos_token_id") is not None:
        ng["eos_token_id"] = 2
    return tree


def write_direct(reader: HFCheckpointReader, cfg, skeleton_iter: str, out_iter: str, progress=None,
                 workers: int = 1) -> int:
    """Stream the HF tensors into a torch_dist checkpoint shaped like the skeleton's; returns the
    number of tensors written. ``workers`` threads each read one tensor (one expert, one row block)
    and write it into their own ``.distcp`` files; memory is about ``workers`` such pieces."""
    import shutil

    from ckpt_convert.dcp_reader import TorchDistReader
    from ckpt_convert.dcp_writer import DCPWriter, run_tasks
    from ckpt_convert.layout import NO_HF_COUNTERPART

    skeleton = TorchDistReader(skeleton_iter)
    source = HFSource(reader, cfg)
    os.makedirs(out_iter)
    writer = DCPWriter(out_iter, progress=progress)

    def whole(key, info):
        t = source.full_tensor(key).to(info.dtype)
        if t.dim() != len(info.shape):
            raise ConversionError(f"'{key}': HF tensor has shape {tuple(t.shape)}, the model "
                                  f"expects {len(info.shape)} dims")
        writer.add_chunk(key, t.shape, (0,) * t.dim(), t)

    def expert(key, info, full, e):
        t = source.full_tensor(full).to(info.dtype)
        writer.add_chunk(key, (info.shape[0], *t.shape), (e,) + (0,) * t.dim(), t.unsqueeze(0))

    def table_rows(key, info, rule, lo, hi, total):
        rows = reader.read_rows(rule.hf[0], lo, hi).to(info.dtype)
        writer.add_chunk(key, (total, rows.shape[1]), (rule.row_start + lo, 0), rows)

    tasks = []  # one tensor / expert / row block each
    for key, info in skeleton.tensors.items():
        if NO_HF_COUNTERPART.search(key):  # width-independent state: take it as initialised
            tasks.append(lambda k=key, i=info: writer.add_chunk(k, i.shape, (0,) * len(i.shape),
                                                                skeleton.read(k)))
        elif key == NGRAM_TABLES:
            rules = source.rules[NGRAM_TABLES]
            total = sum(r.rows for r in rules)
            for rule in rules:
                for lo in range(0, rule.rows, ROW_BLOCK):
                    tasks.append(lambda k=key, i=info, r=rule, lo=lo: table_rows(
                        k, i, r, lo, min(r.rows, lo + ROW_BLOCK), total))
        elif (m := _STACKED_EXPERTS.match(key)) is not None:
            for e in range(info.shape[0]):
                tasks.append(lambda k=key, i=info, e=e, f=f"{m['pre']}.local_experts.{e}.{m['rest']}":
                             expert(k, i, f, e))
        elif key in source.rules:
            tasks.append(lambda k=key, i=info: whole(k, i))
        else:
            raise ConversionError(f"model tensor '{key}' has no HF source (converter and model disagree)")
    try:
        run_tasks(tasks, workers)
        for key in skeleton.objects():
            writer.add_bytes(key, skeleton.read_bytes(key))
        writer.finish(planner_data=skeleton.metadata.planner_data)
    finally:
        writer.close()
    for name in ("common.pt", "metadata.json"):
        shutil.copy(os.path.join(skeleton_iter, name), os.path.join(out_iter, name))
    return len(skeleton.tensors)


def convert(hf_dir: str, save: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
            overwrite: bool = False, model_overrides: Optional[list[str]] = None,
            via_model: bool = False, progress: bool = True, workers: Optional[int] = None) -> dict:
    """Import; returns a summary. Raises ConversionError on bad input (nothing written).

    Default: one process streams the HF tensors into a layout-free torch_dist checkpoint (a
    tiny-width skeleton saved by the training loop's writer supplies the non-weight parts).
    ``via_model``: build the model at TP/PP/EP in TP*PP*EP processes and save it (memory = model)."""
    import shutil
    import tempfile

    from tqdm import tqdm

    from ckpt_convert.dcp_writer import commit_checkpoint
    from ckpt_convert.parallel_launch import launch
    from longcat_megatron.config import RunConfig, build_section
    from longcat_megatron.training.checkpointing import iteration_dir

    reader = HFCheckpointReader(hf_dir)
    cfg = import_model_config(reader, model_overrides)
    check_hf_dir(reader, cfg)
    if cfg.num_experts % ep:
        raise ConversionError(f"--ep {ep} does not divide n_routed_experts={cfg.num_experts}")
    if cfg.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide num_layers={cfg.num_layers}")
    if cfg.num_attention_heads % tp:
        raise ConversionError(f"--tp {tp} does not divide num_attention_heads={cfg.num_attention_heads}")
    nbytes = sum(i.nbytes for i in reader.tensors.values())
    world = tp * pp * ep if via_model else 1
    tree = {"parallel": {"tensor": tp, "pipeline": pp, "expert": ep, "sequence_parallel": tp > 1}}
    workers = workers or default_workers()
    start = time.perf_counter()
    data_seconds = None
    timings: dict = {}
    with atomic_output_dir(save, overwrite=overwrite, timings=timings) as tmp:
        if via_model:
            reader.close()
            filled = sum(launch(_rank_import, world, os.path.abspath(hf_dir), tmp, tp, pp, ep, tree,
                                model_overrides))
        else:
            skeleton = tempfile.mkdtemp(prefix=".skeleton-", dir=os.path.dirname(tmp))
            try:
                launch(_save_skeleton, 1, skeleton_tree(cfg), skeleton)
                bar = tqdm(total=nbytes, unit="B", unit_scale=True, desc="from_hf", disable=not progress,
                           file=sys.stderr)
                # DCP's modules (~1 s of imports) load before the clock of the tensor data starts.
                import torch.distributed.checkpoint.filesystem  # noqa: F401
                t_data = time.perf_counter()
                with bar:
                    filled = write_direct(reader, cfg, iteration_dir(skeleton, 0), iteration_dir(tmp, 0), bar,
                                          workers=workers)
                data_seconds = time.perf_counter() - t_data
            finally:
                shutil.rmtree(skeleton, ignore_errors=True)
            run_cfg = build_section(RunConfig, tree, "")
            run_cfg.model = cfg
            commit_checkpoint(tmp, 0, run_cfg)
    return {"bytes": nbytes, "seconds": time.perf_counter() - start, "world": world,
            "tensors": filled, "output": os.path.abspath(save),
            "workers": 1 if via_model else workers, "data_seconds": data_seconds,
            "flush_seconds": timings["flush_seconds"]}


def main(argv=None) -> int:
    from longcat_megatron.runtime import silence_known_warnings

    silence_known_warnings()
    p = argparse.ArgumentParser(
        prog="python -m ckpt_convert.from_hf",
        description="Convert a Hugging Face LongCat directory (LongcatFlashForCausalLM or the N-gram "
                    "variant) into a megatron-core torch_dist checkpoint at the given TP/PP/EP layout.")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to create (train with checkpoint.load=...)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saved layout")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (uses TP*PP*EP processes)")
    p.add_argument("--model-override", action="append", default=[], metavar="FIELD=VALUE",
                   help="training-only model field for run_config.yaml, e.g. "
                        "budget_target_ffn_experts=8 (repeatable; shape fields come from config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save at the end")
    p.add_argument("--via-model", action="store_true",
                   help="build the model at TP/PP/EP in TP*PP*EP processes and save it (needs the model's "
                        "memory; default: one streaming process, the checkpoint loads under any layout)")
    p.add_argument("--workers", type=int, default=None,
                   help="streaming import: threads reading and writing tensors in parallel (default: CPU "
                        "count, at most 8); memory is about this many times the largest tensor")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        s = convert(args.hf, args.save, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite,
                    model_overrides=args.model_override, via_model=args.via_model,
                    progress=not args.no_progress, workers=args.workers)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = f"; tensor data {s['data_seconds']:.2f}s: {s['bytes'] / max(s['data_seconds'], 1e-9) / 1e9:.2f} " \
        f"GB/s, {s['workers']} workers" if s["data_seconds"] else ""
    print(f"imported {s['bytes'] / 1e9:.3f} GB into {s['output']} on {s['world']} process(es) in "
          f"{s['seconds']:.1f}s ({s['bytes'] / max(s['seconds'], 1e-9) / 1e9:.2f} GB/s{data}; flushed "
          f"to disk in {s['flush_seconds']:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
