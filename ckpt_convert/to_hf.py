"""Export a megatron-core torch_dist LongCat checkpoint to a Hugging Face model directory.

    python -m ckpt_convert.to_hf --load CKPT_DIR [--iteration N] --output HF_DIR \\
        [--tokenizer DIR] [--dtype auto|bf16|fp16|fp32] [--max-shard-size 5GB] [--workers N]
        [--verify [--verify-layers K]]

Runs in one CPU process with no process group, whatever TP/PP/EP/DP layout saved the checkpoint:
every tensor is assembled from the shards that hold it, one tensor (one expert) at a time, and
written into sharded safetensors at its precomputed offset by ``--workers`` threads (peak memory
about ``workers`` x the largest tensor). The output appears only when complete (temporary directory +
rename). See docs/convert.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ckpt_convert import ConversionError, default_workers
from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir
from ckpt_convert.layout import CheckpointLocator, conversion_rules, zero_expert_hf_keys
from ckpt_convert.output_dir import atomic_output_dir
from ckpt_convert.safetensors_writer import ZEROS, FileBytes, ShardedSafetensorsWriter, TensorSpec, parse_size
from ckpt_convert.saved_config import RUN_CONFIG, load_model_config  # noqa: F401  (re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExportItem:
    spec: TensorSpec
    produce: Callable[[], torch.Tensor]
    # Where no cast is needed: the tensor's raw bytes in the checkpoint files (FileBytes, or None when
    # they are not stored raw) or ZEROS; the writer then copies file to file instead of calling produce.
    raw: Optional[Callable[[], object]] = None

    def data(self):
        """What the writer writes: ``raw()`` where that is available, else ``produce()``."""
        if self.raw is not None:
            found = self.raw()
            if found is not None:
                return found
        return self.produce()


# Router tensors exported in fp32 for any --dtype (the released model's dtype for them).
ROUTER_FP32 = re.compile(r"\.mlp\.router\.(classifier\.weight|e_score_correction_bias)$")


def plan_export(locator: CheckpointLocator, cfg, *, dtype: Optional[torch.dtype],
                zero_expert_weights: bool) -> list[ExportItem]:
    """Every HF tensor to write, with its shape/dtype and a function that reads it (lazily)."""
    items: list[ExportItem] = []

    def out_dtype(src: torch.dtype) -> torch.dtype:
        return src if dtype is None or not src.is_floating_point else dtype

    def item(spec: TensorSpec, full: str, src: torch.dtype, start: Optional[int] = None,
             count: Optional[int] = None) -> ExportItem:
        """Rows [start, start+count) of ``full`` (all of it for start=None) as ``spec.dtype``."""
        def produce() -> torch.Tensor:
            t = locator.read(full) if start is None else locator.read_rows(full, start, count)
            return t.to(spec.dtype)

        def raw():
            extents = locator.extents(full, start, count)
            return None if extents is None else FileBytes(tuple((e.path, e.offset, e.length) for e in extents))

        return ExportItem(spec, produce, raw if spec.dtype == src else None)

    for rule in conversion_rules(cfg):
        key, index = locator.require(rule.full, rule.hf[0])
        info = locator.reader.info(key)
        shape = info.shape[len(index):]
        if rule.kind == "gate_up":
            if shape[0] % 2:
                raise ConversionError(f"'{rule.full}' has {shape[0]} rows; a SwiGLU fc1 needs an even count")
            half = shape[0] // 2
            for part, hf_key in enumerate(rule.hf):
                items.append(item(TensorSpec(hf_key, (half, *shape[1:]), out_dtype(info.dtype)),
                                  rule.full, info.dtype, part * half, half))
        elif rule.kind == "rows":
            if rule.row_start + rule.rows > shape[0]:
                raise ConversionError(f"'{rule.full}' has {shape[0]} rows, the config needs "
                                      f"{rule.row_start + rule.rows} (N-gram sizes disagree)")
            items.append(item(TensorSpec(rule.hf[0], (rule.rows, *shape[1:]), out_dtype(info.dtype)),
                              rule.full, info.dtype, rule.row_start, rule.rows))
        elif ROUTER_FP32.search(rule.hf[0]):
            # HF keeps the router in fp32 (``_keep_in_fp32_modules``; the fp8 releases too), whatever
            # --dtype asks for (checkpoints from before bf16 kept it in fp32 may hold it in bf16).
            items.append(item(TensorSpec(rule.hf[0], tuple(shape), torch.float32), rule.full, info.dtype))
        else:
            items.append(item(TensorSpec(rule.hf[0], tuple(shape), out_dtype(info.dtype)), rule.full, info.dtype))
    _check_shapes(items, cfg, locator.reader.path)
    if zero_expert_weights and getattr(cfg, "ngram", None) is None:
        by_name = {it.spec.name: it.spec for it in items}
        for hf_key in zero_expert_hf_keys(cfg):
            m = re.match(r"^(.*\.experts)\.\d+\.(\w+)\.weight$", hf_key)
            ref = by_name[f"{m[1]}.0.{m[2]}.weight"]
            items.append(ExportItem(TensorSpec(hf_key, ref.shape, ref.dtype),
                                    lambda s=ref.shape, d=ref.dtype: torch.zeros(s, dtype=d), lambda: ZEROS))
    unused = locator.unused_model_keys()
    if unused:
        raise ConversionError(
            f"checkpoint '{locator.reader.path}' holds {len(unused)} tensor(s) the converter does not "
            f"know, e.g. '{unused[0]}'; the model config (run_config.yaml) does not describe them"
        )
    return items


def auxiliary_tensors(cfg, items: list[ExportItem]) -> set[str]:
    """HF names written to model-auxiliary.safetensors: LongCat-Flash-Lite (N-gram) keeps its MTP
    tensors there in the released layout; plain LongCat-Flash keeps them in the main shards."""
    if getattr(cfg, "ngram", None) is None:
        return set()
    return {i.spec.name for i in items if i.spec.name.startswith("model.mtp.")}


def _check_shapes(items: list[ExportItem], cfg, path: str) -> None:
    """The shapes the HF config will promise == the shapes found in the checkpoint."""
    want = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.mlp.router.classifier.weight": (cfg.num_experts + cfg.zero_expert_num, cfg.hidden_size),
        "model.layers.0.mlp.experts.0.gate_proj.weight": (cfg.moe_ffn_hidden_size, cfg.hidden_size),
        "model.layers.0.mlps.0.gate_proj.weight": (cfg.ffn_hidden_size, cfg.hidden_size),
    }
    for it in items:
        if it.spec.name in want and it.spec.shape != want[it.spec.name]:
            raise ConversionError(f"checkpoint '{path}': '{it.spec.name}' has shape {it.spec.shape}, "
                                  f"run_config.yaml implies {want[it.spec.name]}")


def copy_tokenizer(src: str, out_dir: str) -> list[str]:
    if not os.path.isdir(src):
        raise ConversionError(f"--tokenizer '{src}' is not a directory")
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not copied:
        raise ConversionError(f"--tokenizer '{src}' holds none of {', '.join(TOKENIZER_FILES)}")
    for name in copied:
        shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
    return copied


def refuse_per_layer_embedding(cfg, where: str) -> None:
    """No Hugging Face model holds per-layer embeddings (docs/ngram.md): refuse before writing."""
    kind = getattr(cfg, "per_layer_embedding", "none")
    if kind != "none":
        raise ConversionError(
            f"{where}: model.per_layer_embedding={kind!r}: there is no Hugging Face format for "
            "per-layer embeddings (transformers' LongcatFlash MLPs have an up projection), so this "
            "checkpoint cannot be exported; only models with model.per_layer_embedding=none convert")


def convert(load: str, output: str, *, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
            dtype: str = "auto", max_shard_size: str = "5GB", zero_expert_weights: bool = True,
            overwrite: bool = False, progress: bool = True, bos_token_id: int = 1,
            eos_token_id: int = 2, workers: Optional[int] = None) -> dict:
    """Export; returns a summary (bytes, seconds, files). Raises ConversionError on bad input."""
    from tqdm import tqdm

    from ckpt_convert.hf_config import write_hf_config

    iter_dir, it = resolve_checkpoint_dir(load, iteration)
    cfg = load_model_config(iter_dir)
    refuse_per_layer_embedding(cfg, iter_dir)
    reader = TorchDistReader(iter_dir)
    locator = CheckpointLocator(reader)
    cast = DTYPES.get(dtype) if dtype != "auto" else None
    if dtype != "auto" and cast is None:
        raise ConversionError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    items = plan_export(locator, cfg, dtype=cast, zero_expert_weights=zero_expert_weights)
    auxiliary = auxiliary_tensors(cfg, items)
    items = [i for i in items if i.spec.name not in auxiliary] + [
        i for i in items if i.spec.name in auxiliary]
    total = sum(i.spec.nbytes for i in items)
    first_float = next(i.spec.dtype for i in items if i.spec.dtype.is_floating_point)
    dtype_name = str(first_float).replace("torch.", "")
    start = time.perf_counter()
    timings: dict = {}
    with atomic_output_dir(output, overwrite=overwrite, timings=timings) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="to_hf",
                   disable=not progress, file=sys.stderr)
        # The config first: an unexportable model fails before any tensor is written.
        write_hf_config(tmp, cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype_name)
        writer = ShardedSafetensorsWriter(tmp, [i.spec for i in items], parse_size(max_shard_size), bar,
                                          auxiliary=auxiliary)
        by_name = {i.spec.name: i for i in items}
        t_data = time.perf_counter()
        try:
            writer.write_parallel(lambda name: by_name[name].data(), workers or default_workers())
        finally:
            writer.close()
            bar.close()
        data_seconds = time.perf_counter() - t_data
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
    seconds = time.perf_counter() - start
    return {"iteration": it, "bytes": total, "seconds": seconds, "tensors": len(items),
            "files": len(writer.files), "output": os.path.abspath(output),
            "workers": workers or default_workers(), "data_seconds": data_seconds,
            "flush_seconds": timings["flush_seconds"]}


def main(argv=None) -> int:
    from longcat_megatron.runtime import silence_known_warnings

    silence_known_warnings()
    p = argparse.ArgumentParser(
        prog="python -m ckpt_convert.to_hf",
        description="Convert a megatron-core torch_dist LongCat checkpoint (any TP/PP/EP/DP layout) "
                    "into a Hugging Face directory, on one CPU process, streaming one tensor at a time.")
    p.add_argument("--load", required=True, help="training --save directory (with "
                   "latest_checkpointed_iteration.txt) or one iter_NNNNNNN directory")
    p.add_argument("--iteration", type=int, help="iteration to export (default: the latest committed)")
    p.add_argument("--output", required=True, help="HF directory to create (must not exist unless --overwrite)")
    p.add_argument("--tokenizer", help="directory whose tokenizer files are copied into the output")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="cast floating tensors (default: keep the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads reading and writing tensors in parallel (default: CPU count, at most "
                        "8); peak memory is about this many times the largest tensor")
    p.add_argument("--no-zero-expert-weights", action="store_true",
                   help="plain models: omit the unused zero-expert gate/up tensors that transformers 5.x "
                        "LongcatFlashForCausalLM requires (gives Meituan's exact layout)")
    p.add_argument("--bos-token-id", type=int, default=1)
    p.add_argument("--eos-token-id", type=int, default=2,
                   help="eos for config.json (N-gram models use model.ngram.eos_token_id)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output at the end")
    p.add_argument("--verify", action="store_true",
                   help="after export, load both sides and compare logits on fixed prompts "
                        "(needs memory for the whole model twice; for small/medium models)")
    p.add_argument("--verify-layers", type=int, default=None, metavar="K",
                   help="with --verify: compare only a slice (embedding, first K shortcut layers, "
                        "final norm, LM head; no MTP) so large models fit in memory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = convert(args.load, args.output, iteration=args.iteration, tokenizer=args.tokenizer,
                          dtype=args.dtype, max_shard_size=args.max_shard_size,
                          zero_expert_weights=not args.no_zero_expert_weights, overwrite=args.overwrite,
                          progress=not args.no_progress, bos_token_id=args.bos_token_id,
                          eos_token_id=args.eos_token_id, workers=args.workers)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gbs = summary["bytes"] / max(summary["data_seconds"], 1e-9) / 1e9
    print(f"wrote {summary['tensors']} tensors ({summary['bytes'] / 1e9:.3f} GB, {summary['files']} "
          f"file(s)) from iteration {summary['iteration']} to {summary['output']} in "
          f"{summary['seconds']:.1f}s (tensor data {summary['data_seconds']:.2f}s: {gbs:.2f} GB/s, "
          f"{summary['workers']} workers; flushed to disk in {summary['flush_seconds']:.2f}s)")
    if args.verify:
        from ckpt_convert.verify import verify_export

        report = verify_export(args.load, args.output, iteration=summary["iteration"],
                               layers=args.verify_layers)
        print(report.describe())
        if not report.ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
