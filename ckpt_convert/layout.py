"""Where every tensor lives on each side, at streaming granularity.

Three namings meet here:

* **full keys**: this project's unsharded (TP=PP=EP=1) state-dict keys, e.g.
  ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``; the model's
  ``longcat_megatron.model.hf_mapping`` maps them to HF keys (fc1 = cat[gate, up]).
* **checkpoint keys**: the keys of the torch_dist checkpoint (megatron ``sharded_state_dict``).
  They equal the full keys except that megatron's SequentialMLP stores the experts of a layer stacked,
  ``<layer>.mlp.experts.experts.linear_fc1.weight [E, 2I, H]`` (and a block that stacks its layers
  stores ``decoder.layers.<rest> [L, ...]``). The N-gram sub-tables are one row-concatenated
  ``embedding.ngram_tables [sum M_i, D]`` tensor.
* **HF keys**: the on-disk safetensors layout (Meituan's per-expert naming).

:func:`conversion_rules` lists ``(full key, HF keys, kind)`` for a config; :class:`CheckpointLocator`
finds a full key's tensor (or a row range of it) inside a torch_dist checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ckpt_convert import ConversionError
from ckpt_convert.dcp_reader import TorchDistReader

NGRAM_TABLES = "embedding.ngram_tables"
# Checkpoint tensors with no HF counterpart (budget-controller state restarts at zero on import).
NO_HF_COUNTERPART = re.compile(r"\.router\.controller\.")
_EXPERT_FULL = re.compile(r"^(?P<pre>.*\.experts)\.local_experts\.(?P<e>\d+)\.(?P<rest>.*)$")
_LAYER_FULL = re.compile(r"^(?P<pre>(?:.*\.)?layers)\.(?P<l>\d+)\.(?P<rest>.*)$")


@dataclass(frozen=True)
class Rule:
    """One full-key tensor and its HF counterpart(s).

    kind: ``direct`` (same tensor), ``gate_up`` (full = cat[hf[0], hf[1]] along rows) or
    ``rows`` (hf[0] = full[row_start : row_start + rows], used for the N-gram sub-tables).
    """

    full: str
    hf: tuple[str, ...]
    kind: str = "direct"
    row_start: int = 0
    rows: int = 0


def conversion_rules(cfg) -> list[Rule]:
    """Every tensor of a LongCat model with config ``cfg`` (plain, N-gram, MTP)."""
    from longcat_megatron.model import hf_mapping  # the model's key table

    table = getattr(hf_mapping, "key_rules", None) or getattr(hf_mapping, "_rules")
    rules = []
    for ours, hf in table(cfg):
        if isinstance(hf, tuple):
            rules.append(Rule(ours, tuple(hf), "gate_up"))
        else:
            rules.append(Rule(ours, (hf,), "direct"))
    ng = getattr(cfg, "ngram", None)
    if ng is not None:
        rules = [r for r in rules if r.full != NGRAM_TABLES]  # sub-tables need row ranges (below)
        start = 0
        for i, rows in enumerate(ng.moduli(cfg.vocab_size)):
            rules.append(Rule(NGRAM_TABLES, (f"model.ngram_embeddings.embedders.{i}.weight",), "rows",
                              start, rows))
            start += rows
        have = {r.full for r in rules}
        for i in range(ng.num_tables):
            if f"embedding.post_projs.{i}.weight" not in have:
                rules.append(Rule(f"embedding.post_projs.{i}.weight",
                                  (f"model.ngram_embeddings.post_projs.{i}.weight",)))
    return rules


def zero_expert_hf_keys(cfg) -> list[str]:
    """gate/up keys of the zero experts that transformers 5.x ``LongcatFlashForCausalLM`` requires
    (it allocates ``gate_up_proj`` for all N+Z experts and refuses a checkpoint without them)."""
    keys = []
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts, cfg.num_experts + cfg.zero_expert_num):
            for p in ("gate", "up"):
                keys.append(f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight")
    return keys


class CheckpointLocator:
    """Full key -> (checkpoint key, index over its stacked leading axes) in one torch_dist checkpoint."""

    def __init__(self, reader: TorchDistReader):
        self.reader = reader
        self.used: set[str] = set()

    def locate(self, full: str) -> Optional[tuple[str, tuple[int, ...]]]:
        found = self._locate(full)
        if found is not None:
            shape = self.reader.tensors[found[0]].shape
            if any(i >= n for i, n in zip(found[1], shape)):
                return None  # e.g. expert 5 of a checkpoint that stacks 4 experts
        return found

    def _locate(self, full: str) -> Optional[tuple[str, tuple[int, ...]]]:
        tensors = self.reader.tensors
        if full in tensors:
            return full, ()
        index: tuple[int, ...] = ()
        key = full
        m = _EXPERT_FULL.match(key)
        if m:
            key, index = f"{m['pre']}.experts.{m['rest']}", (int(m["e"]),)
            if key in tensors:
                return key, index
        m = _LAYER_FULL.match(key)
        if m and f"{m['pre']}.{m['rest']}" in tensors:
            return f"{m['pre']}.{m['rest']}", (int(m["l"]),) + index
        return None

    def shape(self, full: str) -> tuple[int, ...]:
        key, index = self.require(full)
        return self.reader.info(key).shape[len(index):]

    def require(self, full: str, needed_for: str = "") -> tuple[str, tuple[int, ...]]:
        found = self.locate(full)
        if found is None:
            why = f" (needed for HF '{needed_for}')" if needed_for else ""
            raise ConversionError(
                f"checkpoint '{self.reader.path}' has no tensor for '{full}'{why}; the run_config.yaml "
                "model section and the saved weights disagree"
            )
        self.used.add(found[0])
        return found

    def region(self, full: str, start: Optional[int] = None, count: Optional[int] = None):
        """``(checkpoint key, offsets, sizes, shape)`` of rows ``[start, start+count)`` of full tensor
        ``full`` (the whole tensor when ``start`` is None)."""
        key, index = self.require(full)
        inner = self.reader.info(key).shape[len(index):]
        if start is None:
            return key, list(index) + [0] * len(inner), [1] * len(index) + list(inner), tuple(inner)
        count = inner[0] - start if count is None else count
        offsets = list(index) + [start] + [0] * (len(inner) - 1)
        sizes = [1] * len(index) + [count] + list(inner[1:])
        return key, offsets, sizes, (count, *inner[1:])

    def read_rows(self, full: str, start: int = 0, count: Optional[int] = None):
        """Rows ``[start, start+count)`` (all rows by default) of full tensor ``full``."""
        key, offsets, sizes, shape = self.region(full, start, count)
        return self.reader.read_region(key, offsets, sizes).reshape(shape)

    def extents(self, full: str, start: Optional[int] = None, count: Optional[int] = None):
        """Rows ``[start, start+count)`` (the whole tensor when ``start`` is None) as raw byte runs of
        the shard files (:meth:`TorchDistReader.region_extents`), or None."""
        key, offsets, sizes, _ = self.region(full, start, count)
        return self.reader.region_extents(key, offsets, sizes)

    def read(self, full: str):
        key, index = self.require(full)
        return self.reader.read(key, index)

    def unused_model_keys(self) -> list[str]:
        """Checkpoint model tensors no rule consumed (excluding state without an HF counterpart)."""
        return [k for k in self.reader.model_keys()
                if k not in self.used and not NO_HF_COUNTERPART.search(k)]
