"""One-rank rehearsal at real width: one rank's shard of a cluster layout, in one CPU process, with
a fake process group standing in for the other ranks; peak memory of forward + backward + optimizer
step against the memory plan (``longcat_megatron/memory_plan.py``) for the same layout and depth.

    python bench/one_rank_rehearsal.py         # lite-8k lite-32k flash-8k flash-8k-last -> docs/benchmarks.md
    python bench/one_rank_rehearsal.py --layouts lite-8k --no-write
    python bench/one_rank_rehearsal.py --smoke               # tiny sizes, every mechanism (CI)

What runs (per layout, in a fresh process, as Megatron-LM's ``--fake-process-group`` does):

* ``torch.distributed.init_process_group("fake", store=FakeStore(), rank=R, world_size=W)`` with W
  the recipe's world size; megatron's parallel groups from ``runtime.init_parallel_state`` (its gloo
  groups become fake groups too: gloo cannot rendezvous through a FakeStore), the CPU adaptations of
  ``runtime.init_distributed``; the model, megatron DDP and the distributed optimizer from
  ``training.setup.build_model`` / ``build_optimizer`` (bf16 ``Float16Module``, fp32 grad buffers,
  ``overlap_grad_reduce`` / ``overlap_param_gather`` as configured), one optimizer step through
  megatron's own forward/backward schedule with the training loop's ``forward_step``. Real CPU
  allocations of this rank's shard: fake CUDA tensors do not work on a CPU-only torch build.
* Reduced depth, full width: the recipe's hidden size, heads, experts per rank, vocabulary shard,
  N-gram shard, sequence length and micro-batch; ``model.num_layers`` = layers per pipeline stage x
  PP with 1 layer per stage (MTP head as shipped).
* The fake backend hallucinates collectives: all-gathers repeat the input, reduce-scatters keep this
  rank's chunk, all-reduces and broadcasts leave the input, point-to-point receives leave the buffer
  alone. What the bench adds so that every tensor has its cluster shape under balanced routing:
  (1) forced-balanced routing: the router's top-k picks ``budget_target_ffn_experts`` FFN experts per
  token round-robin (token t -> experts K_e*t ... K_e*t+K_e-1 mod N) and the rest zero experts
  round-robin, so every FFN expert gets the same number of tokens from every rank (the router's
  logits, softmax and weights are computed as usual); the MoE dispatcher's all-gathered counts are
  then every rank's equal counts, as on a balanced cluster; (2) ``all_to_all_single`` fills its
  output from the input chunk by chunk (same sizes under balance); integer payloads on an N-gram
  shard group (the row ids a rank is asked for) are mapped into this rank's row range, as the
  owners' rows would be; (3) point-to-point receives (pipeline activations / gradients) are filled
  with N(0, 0.02) values instead of being left uninitialised.
* Pipeline parallel: megatron's 1F1B schedule with as many micro-batches as the rank's stage holds
  in flight, ``min(PP - stage, micro-batches)`` (the first stage: min(PP, m), what the plan assumes;
  the last stage: 1); the stage then holds that many micro-batches' activations at its peak, as
  with the recipe's full count (more micro-batches only repeat the steady state).

Memory (Linux): glibc mmaps every block over 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so the resident
set follows the live tensors (tests/test_memory_plan.py's method). ``RSS0`` after the process groups;
model state = RSS after building the model, DDP, optimizer and one optimizer step on zero gradients
(which allocates Adam's moments) minus RSS0, and also counted tensor by tensor (parameters, grad
buffers, optimizer storages not shared with the model); activations = the peak resident set of the
step (``/proc/self/clear_refs`` resets VmHWM) minus the model-state RSS, over forward + backward and
over the optimizer step separately; held = RSS after the last forward before a backward minus the
model-state RSS. Activations "on GPU terms" subtract the bottom-right causal masks that the CPU SDPA
kernel materialises and keeps for backward for the context-parallel chunks (``causal_lower_right``;
counted as torch builds them, in the activation dtype): CUDA's flash / memory-efficient kernels take
the causal flag and build none. Per part (embedding, each layer, MTP head, LM heads + losses) the
RSS after each part's forward gives what it holds for backward.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 1024 ** 3
UNIT = (GIB, "GiB")      # of the printed figures (MiB for --smoke)
LITE = "configs/longcat_flash_lite.yaml"
FLASH = "configs/longcat_flash.yaml"

# name -> config, stage file, world size, the rank rehearsed (Flash: rank 0 is the first pipeline
# stage, rank 768 the first rank of the last), extra overrides. World sizes: the recipes' plans in
# docs/operations.md (Lite: any multiple of 64; Flash: 1024).
LAYOUTS = {
    "lite-8k": dict(config=LITE, stage="configs/stages/lite_pretrain.yaml", world=512, rank=0),
    "lite-32k": dict(config=LITE, stage="configs/stages/lite_midtrain_32k.yaml", world=512, rank=0),
    "flash-8k": dict(config=FLASH, stage="configs/stages/flash_pretrain.yaml", world=1024, rank=0),
    "flash-8k-last": dict(config=FLASH, stage="configs/stages/flash_pretrain.yaml", world=1024,
                          rank=768),
}
DEFAULT_LAYOUTS = ("lite-8k", "lite-32k", "flash-8k", "flash-8k-last")
# Tiny sizes that exercise every mechanism (PP2 1F1B, CP2, TP2+SP, EP4, N-gram tables over the
# expert group, MTP): the first and the last pipeline stage.
SMOKE_OVERRIDES = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.context=2",
                   "parallel.expert=4", "parallel.expert_tensor=1", "parallel.sequence_parallel=true",
                   "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                   "model.ngram.partition=tensor_data", "optimizer.bf16=true",
                   "train.micro_batch_size=1", "train.global_batch_size=8", "data.seq_length=64"]
SMOKE = {
    "smoke-first": dict(config="configs/tiny_longcat_ngram.yaml", stage=None, world=16, rank=0,
                        overrides=SMOKE_OVERRIDES),
    "smoke-last": dict(config="configs/tiny_longcat_ngram.yaml", stage=None, world=16, rank=8,
                       overrides=SMOKE_OVERRIDES),
}
ALL = {**LAYOUTS, **SMOKE}


def load_run_config(spec: dict, layers_per_stage: int = 1):
    """The layout's RunConfig at reduced depth (``layers_per_stage`` x PP layers), mock data."""
    import warnings

    from longcat_megatron.config import load_config
    from longcat_megatron.recipe import stage_overrides

    path = os.path.join(ROOT, spec["config"])
    over = ((stage_overrides(os.path.join(ROOT, spec["stage"])) if spec.get("stage") else [])
            + list(spec.get("overrides", ())) + ["data.mock=true"])
    with warnings.catch_warnings():
        # at reduced depth the N-gram tables are most of the model: expected, not advice
        warnings.filterwarnings("ignore", message=r"\[ngram_params_over_half\]")
        pipeline = load_config(path, over).parallel.pipeline
        return load_config(path, over + [f"model.num_layers={layers_per_stage * pipeline}"])


def resolve(cfg, world: int):
    from longcat_megatron.runtime import resolve_layout

    p = cfg.parallel
    return resolve_layout(world, p.tensor, p.pipeline, p.context, p.expert, p.virtual_pipeline,
                          cfg.model.num_experts, p.expert_tensor)


def micro_batches(cfg, layout) -> int:
    """Micro-batches per DP rank and step in the recipe."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * layout.data)


def micro_batches_run(cfg, layout, pipeline_rank: int = 0) -> int:
    """Micro-batches the rehearsal runs: as many as pipeline stage ``pipeline_rank`` holds in
    flight under 1F1B, min(PP - stage, micro-batches) (the first stage: min(PP, m)); 1 without PP."""
    if layout.pipeline == 1:
        return 1
    return min(layout.pipeline - pipeline_rank, micro_batches(cfg, layout))


def plan_for(cfg, layout, first: bool, last: bool):
    """The memory plan of the stage (first / last / both under PP1) for this config and layout."""
    from longcat_megatron.memory_plan import stage_plan
    from longcat_megatron.planning import count_parameters

    return stage_plan(cfg, count_parameters(cfg), layout, first=first, last=last,
                      num_micro=micro_batches(cfg, layout))


# ------------------------------------------------------------------------------------ /proc memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def rss() -> int:
    return _status_kib("VmRSS") * 1024


def hwm() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ------------------------------------------------------------------------------ fake collectives
_NGRAM_ROWS: list = []     # (shard group, row_start, row_end) of this rank's N-gram table shards


def _chunks(sizes, total: int, parts: int) -> list:
    if sizes is None:
        return [total // parts] * parts
    return [int(x) for x in sizes]


def _fill_all_to_all(output, input, output_split_sizes, input_split_sizes, group) -> None:
    """Output chunk j <- input chunk j (cycled or cut to the output chunk's length)."""
    import torch

    parts = group.size() if group is not None else torch.distributed.get_world_size()
    outs = _chunks(output_split_sizes, output.shape[0], parts)
    ins = _chunks(input_split_sizes, input.shape[0], parts)
    o = i = 0
    for n_out, n_in in zip(outs, ins):
        if n_out:
            src = input[i: i + n_in] if n_in else input[:1]
            if src.shape[0] == 0:
                output[o: o + n_out].zero_()
            else:
                reps = -(-n_out // src.shape[0])
                output[o: o + n_out].copy_(src.repeat((reps,) + (1,) * (src.dim() - 1))[:n_out])
        o, i = o + n_out, i + n_in
    if output_split_sizes is not None and not output.is_floating_point():
        for g, start, end in _NGRAM_ROWS:
            if g is group:  # row ids this rank is asked for: they are rows it owns
                output.copy_(start + output.remainder(end - start))


def install_fake_collectives() -> None:
    """Patch ``torch.distributed`` for the fake backend (see the module docstring)."""
    import torch
    import torch.distributed as dist

    if getattr(dist, "_rehearsal_patched", False):
        return
    new_group, a2a, batch_p2p = dist.new_group, dist.all_to_all_single, dist.batch_isend_irecv
    irecv = dist.irecv

    def fake_new_group(*args, **kwargs):
        kwargs.pop("backend", None)      # gloo cannot rendezvous through a FakeStore
        kwargs.pop("pg_options", None)
        return new_group(*args, **kwargs)

    def fake_all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                               group=None, async_op=False):
        work = a2a(output, input, output_split_sizes, input_split_sizes, group=group,
                   async_op=async_op)
        with torch.no_grad():
            _fill_all_to_all(output, input, output_split_sizes, input_split_sizes, group)
        return work

    def fake_batch_isend_irecv(p2p_op_list):
        reqs = batch_p2p(p2p_op_list)
        with torch.no_grad():
            for op in p2p_op_list:
                if op.op is irecv and op.tensor.is_floating_point():
                    op.tensor.normal_(0.0, 0.02)
        return reqs

    dist.new_group = fake_new_group
    dist.all_to_all_single = fake_all_to_all_single
    dist.batch_isend_irecv = fake_batch_isend_irecv
    dist._rehearsal_patched = True


def register_ngram_shards(model_chunks) -> int:
    """Note the row range of every N-gram table shard exchanged over a group (tensor_data)."""
    from longcat_megatron.model.ngram_embedding import NgramEmbedding

    n = 0
    for chunk in model_chunks:
        for mod in chunk.modules():
            if isinstance(mod, NgramEmbedding) and mod.ngram.partition == "tensor_data" \
                    and mod.shard_size > 1:
                _NGRAM_ROWS.append((mod.shard_group, mod.row_start, mod.row_end))
                n += 1
    return n


# ------------------------------------------------------------------------------- balanced routing
class _BalancedTorch:
    """Stands in for ``torch`` inside ``longcat_megatron.model.router``: ``topk`` returns balanced
    round-robin picks (K_e FFN experts, then zero experts); everything else is torch."""

    def __init__(self, torch_module, num_ffn: int, num_zero: int, ffn_per_token: int):
        self._torch, self.num_ffn, self.num_zero, self.k_ffn = (torch_module, num_ffn, num_zero,
                                                                ffn_per_token)

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def topk(self, input, k, dim=-1, largest=True, sorted=True):
        torch = self._torch
        tokens = input.shape[0]
        t = torch.arange(tokens, device=input.device)[:, None]
        k_ffn, k_zero = min(self.k_ffn, k), k - min(self.k_ffn, k)
        ffn = (t * k_ffn + torch.arange(k_ffn, device=input.device)) % self.num_ffn
        parts = [ffn]
        if k_zero:
            zero = (t * k_zero + torch.arange(k_zero, device=input.device)) % max(1, self.num_zero)
            parts.append(self.num_ffn + zero)
        idx = torch.cat(parts, dim=1)
        return input.gather(1, idx), idx


def force_balanced_routing(model_cfg) -> int:
    """Patch the router's top-k (see :class:`_BalancedTorch`); returns K_e used."""
    import torch

    from longcat_megatron.model import router

    target = model_cfg.budget_target_ffn_experts
    if target is None:
        target = model_cfg.moe_router_topk * model_cfg.num_experts / (model_cfg.num_experts
                                                                      + model_cfg.zero_expert_num)
    k_ffn = int(round(target))
    router.torch = _BalancedTorch(torch, model_cfg.num_experts, model_cfg.zero_expert_num, k_ffn)
    return k_ffn


# ------------------------------------------------------------------------------------ the worker
def _storage_bytes(tensors, exclude: set) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in exclude or ptr in seen:
            continue
        seen.add(ptr)
        total += s.nbytes()
    return total


def count_state(model_chunks, optimizer) -> dict:
    """Bytes of the model state, tensor by tensor: weights (parameter storages: megatron DDP's
    param buffers), gradients (DDP grad buffers), optimizer (fp32 main copies + Adam moments: the
    optimizers' storages that are not the model's)."""
    import torch

    params = [p for c in model_chunks for p in c.parameters()]
    grads = []
    for c in model_chunks:
        for buf in list(getattr(c, "buffers", [])) + list(getattr(c, "expert_parallel_buffers", [])):
            grads.append(buf.grad_data)
    weights = _storage_bytes(params, set())
    grad_bytes = _storage_bytes(grads, set())
    model_ptrs = {t.untyped_storage().data_ptr() for t in params + grads}
    opt_tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        opt_tensors += [p for g in inner.param_groups for p in g["params"]]
        opt_tensors += [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]
    return {"weights": weights, "gradients": grad_bytes,
            "optimizer": _storage_bytes(opt_tensors, model_ptrs),
            "params_on_rank": sum(p.numel() for p in params)}


class PartProbe:
    """RSS after each top-level part of the model's forward (embedding, each shortcut layer, final
    norm, MTP head, each LM-head call), while ``on``: what each part adds to the held memory."""

    def __init__(self, model_chunks):
        from longcat_megatron.model.longcat import LongcatModel

        self.on, self.events = False, []
        for chunk in model_chunks:
            for mod in chunk.modules():
                if isinstance(mod, LongcatModel):
                    parts = [("embedding", getattr(mod, "embedding", None))]
                    parts += [(f"layer {k}", layer) for k, layer in mod.decoder.layers.items()]
                    parts += [("final norm", getattr(mod, "final_layernorm", None)),
                              ("MTP head", getattr(mod, "mtp_head", None)),
                              ("LM head", getattr(mod, "output_layer", None))]
                    for label, part in parts:
                        if part is not None:
                            part.register_forward_hook(self._hook(label))

    def _hook(self, label):
        def hook(module, args, output):
            if self.on:
                self.events.append((label, rss()))
        return hook

    def mark(self, label: str) -> None:
        if self.on:
            self.events.append((label, rss()))

    def first_forward(self) -> list:
        """(part, bytes added) over the first micro-batch's forward, in order; the parts after the
        final norm (MTP head) and after the MTP head (LM-head calls, their losses: the last entry
        is the main loss) as they come."""
        out, prev = [], None
        for label, value in self.events:
            if label == "start" and prev is None:
                prev = value
                continue
            if prev is None:
                continue
            out.append((label, value - prev))
            prev = value
            if label == "end":
                break
        return out


def group_parts(parts: list) -> dict:
    """Per-part held bytes as the plan names them: input embedding, layers, MTP head, LM heads +
    losses (every LM-head call and loss after the MTP head, or after the final norm)."""
    out: dict = {}
    tail = False
    for label, value in parts:
        if label == "LM head" or tail:
            tail = True
            key = "LM head + loss"
        elif label == "end":
            key = "other"
        else:
            key = {"embedding": "input embedding", "final norm": "layers",
                   "MTP head": "MTP head"}.get(label, "layers" if label.startswith("layer") else label)
        out[key] = out.get(key, 0) + value
    return out


class CausalMaskTally:
    """Counts the elements of the bottom-right causal masks torch materialises for SDPA on CPU
    (the context-parallel chunks' ``causal_lower_right``: the CPU flash kernel takes a mask and
    keeps it, in the activation dtype, for backward; CUDA's flash / memory-efficient kernels take
    the causal flag and build none). Counted in forwards while ``on``."""

    def __init__(self):
        import torch
        from torch.nn.attention import bias

        self.on, self.elements = False, 0
        original = bias.CausalBias._materialize
        tally = self

        def materialize(self, device=None):
            mask = original(self, device)
            if tally.on and torch.is_grad_enabled():
                tally.elements += mask.numel()
            return mask

        bias.CausalBias._materialize = materialize


def make_batches(cfg, n: int, seed: int = 0) -> list:
    """``n`` synthetic micro-batches in the data pipeline's format (full sequence; the training
    loop's ``forward_step`` takes this rank's CP chunks)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s, v = cfg.train.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size
    out = []
    for _ in range(n):
        tokens = torch.randint(3, v, (b, s), generator=g)
        out.append(dict(tokens=tokens, labels=torch.roll(tokens, -1, 1),
                        loss_mask=torch.ones(b, s), attention_mask=None,
                        position_ids=torch.arange(s)[None].expand(b, s).contiguous()))
    return out


def rehearse(name: str, steps: int = 1) -> dict:
    """(In a fresh process) one rank of layout ``name``: build, ``steps`` optimizer steps; the
    memory figures in bytes (see the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from longcat_megatron import cpu_compat, mcore_fixes, runtime
    from longcat_megatron.training.loop import forward_step
    from longcat_megatron.training.setup import build_model, build_optimizer, model_hook

    spec = ALL[name]
    cfg = load_run_config(spec)
    layout = resolve(cfg, spec["world"])
    clock = time.perf_counter()
    install_fake_collectives()
    cpu_compat.apply()                  # what runtime.init_distributed applies on CPU
    mcore_fixes.apply()
    dist.init_process_group("fake", store=FakeStore(), rank=spec["rank"], world_size=spec["world"])
    runtime.init_distributed()          # already initialised: only adds the object-collective group
    runtime.init_parallel_state(layout)
    runtime.set_seed(cfg.train.seed)
    from megatron.core import parallel_state as ps

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    ranks = dict(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                 cp=ps.get_context_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
                 dp=ps.get_data_parallel_rank())
    k_ffn = force_balanced_routing(cfg.model)
    t_init = time.perf_counter() - clock
    rss0 = rss()

    clock = time.perf_counter()
    model = build_model(cfg, layout)
    optimizer = build_optimizer(cfg, model)
    register_ngram_shards(model)
    probe_parts = PartProbe(model)
    masks = CausalMaskTally()
    act_bytes = 2 if cfg.optimizer.bf16 else 4
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tf = model[0].config
    tf.finalize_model_grads_func = finalize_model_grads
    tf.grad_scale_func = optimizer.scale_loss
    tf.no_sync_func = model[0].no_sync
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()                    # zero gradients: allocates Adam's moments, moves nothing
    state = count_state(model, optimizer)
    t_build = time.perf_counter() - clock
    rss_state = rss()

    n_micro = micro_batches_run(cfg, layout, ranks["pp"])
    fwd_bwd = get_forward_backward_func()
    results = []
    for step in range(steps):
        held, fwd_hwm = [], []

        def probe(data_iterator, chunk):
            probe_parts.mark("start")
            out = forward_step(data_iterator, chunk)
            probe_parts.mark("end")
            held.append(rss())
            fwd_hwm.append(hwm())
            return out

        for m in model:
            m.train()
            m.zero_grad_buffer()
        optimizer.zero_grad()
        batches = make_batches(cfg, n_micro, seed=step)
        probe_parts.on, probe_parts.events = step == 0, []
        masks.on, masks.elements = True, 0
        reset_hwm()
        clock = time.perf_counter()
        fwd_bwd(forward_step_func=probe, data_iterator=iter(batches), model=model[0],
                num_microbatches=n_micro, seq_length=cfg.data.seq_length,
                micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
        t_fb = time.perf_counter() - clock
        probe_parts.on = masks.on = False
        # Every forward of the step precedes the first backward (the stage runs the micro-batches
        # it holds in flight), so all masks counted are held at once at the peak.
        cpu_masks = masks.elements * act_bytes
        parts = probe_parts.first_forward() if step == 0 else []
        fb_peak, after_fb = hwm(), rss()
        reset_hwm()
        clock = time.perf_counter()
        optimizer.step()
        t_opt = time.perf_counter() - clock
        opt_peak = hwm()
        for hook in model_hook(model, "on_train_step_end"):
            hook(step + 1)
        metrics = {}
        for fn in model_hook(model, "training_metrics"):
            metrics.update(fn() or {})
        ffn_per_tok = [v for k, v in metrics.items() if k.endswith("ffn_experts_per_token")]
        max_load = [v for k, v in metrics.items() if k.endswith("load_max_over_mean")]
        at = held.index(max(held)) if held else None
        results.append(dict(fwd_bwd_peak=fb_peak - rss_state,
                            fwd_peak=(fwd_hwm[at] - rss_state) if held else 0,
                            cpu_causal_masks=cpu_masks, opt_peak=opt_peak - rss_state,
                            held=(max(held) - rss_state) if held else 0, after_fwd_bwd=after_fb - rss_state,
                            forwards=len(held), fwd_bwd_s=t_fb, opt_s=t_opt,
                            ffn_experts_per_token=max(ffn_per_tok) if ffn_per_tok else None,
                            load_max_over_mean=max(max_load) if max_load else None,
                            parts=parts))
    return dict(name=name, world=spec["world"], rank=spec["rank"], first=first, last=last,
                ranks=ranks, layout=layout.__dict__, expert_data=layout.expert_data,
                num_layers=cfg.model.num_layers, micro_batches_run=n_micro,
                micro_batches_recipe=micro_batches(cfg, layout), k_ffn=k_ffn,
                rss0=rss0, model_state_rss=rss_state - rss0, counted=state, steps=results,
                init_s=t_init, build_s=t_build, load=os.getloadavg(),
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------ the driver
def run_worker(name: str, steps: int, timeout: int) -> dict:
    """:func:`rehearse` in a fresh process whose glibc mmaps every block over 64 KiB."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0", TORCHDYNAMO_DISABLE="1", LONGCAT_FORCE_CPU="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    clock = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                           "--steps", str(steps)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - clock
    return out


def compare(result: dict) -> dict:
    """The measured figures of ``result`` next to the plan of the same stage, layout and depth.
    Activations are taken on GPU terms: the CPU-only causal masks of context-parallel attention
    (:class:`CausalMaskTally`) are subtracted from the forward + backward peak."""
    spec = ALL[result["name"]]
    cfg = load_run_config(spec)
    layout = resolve(cfg, spec["world"])
    plan = plan_for(cfg, layout, result["first"], result["last"])
    state_plan = plan.parts["weights"] + plan.parts["gradients"] + plan.parts["optimizer"]

    def gpu_terms(s):
        return max(s["fwd_bwd_peak"] - s.get("cpu_causal_masks", 0), s["opt_peak"])

    step = max(result["steps"], key=gpu_terms)
    act = gpu_terms(step)
    counted = result["counted"]
    state = counted["weights"] + counted["gradients"] + counted["optimizer"]
    total = result["model_state_rss"] + act
    return dict(plan=plan, state_plan=state_plan, state_counted=state, act=act, step=step,
                total=total, r_state=state_plan / state, r_act=plan.parts["activations"] / act,
                r_total=plan.total / total)


def _stage(r: dict) -> str:
    if r["first"] and r["last"]:
        return "only stage"
    return "first stage" if r["first"] else ("last stage" if r["last"] else "middle stage")


def table(results: list) -> str:
    g = lambda b: f"{b / UNIT[0]:.2f}"  # noqa: E731
    u = UNIT[1]
    head = (f"| layout | world, rank | TP / CP / PP / EP / ETP / DP / expert-DP | depth run | "
            f"micro-batches run | model state: counted (RSS) {u} | plan: weights + grads + Adam "
            f"{u} | plan / counted | activations: peak fwd+bwd (held; optimizer step) {u} | "
            f"CPU-only CP masks {u} | activations, GPU terms {u} | plan activations {u} | "
            f"plan / measured | total: measured {u} | plan total {u} | plan / measured |")
    lines = [head, "|" + "---|" * 16]
    for r in results:
        c, lay = compare(r), r["layout"]
        s = c["step"]
        p = c["plan"].parts
        etp = lay["expert_tensor"] if lay["expert_tensor"] is not None else lay["tensor"]
        layers = r["num_layers"] // lay["pipeline"]
        lines.append(
            f"| {r['name']} | {r['world']}, {r['rank']} ({_stage(r)}) | {lay['tensor']} / "
            f"{lay['context']} / {lay['pipeline']} / {lay['expert']} / {etp} / {lay['data']} / "
            f"{r['expert_data']} | {layers} layer{'s' if layers > 1 else ''} of {r['num_layers']}"
            f"{' + MTP' if r['last'] and _has_mtp(r) else ''} | {r['micro_batches_run']} "
            f"(recipe {r['micro_batches_recipe']}) | {g(c['state_counted'])} "
            f"({g(r['model_state_rss'])}) | {g(p['weights'])} + {g(p['gradients'])} + "
            f"{g(p['optimizer'])} = {g(c['state_plan'])} | {c['r_state']:.2f} | "
            f"{g(s['fwd_bwd_peak'])} ({g(s['held'])}; {g(s['opt_peak'])}) | "
            f"{g(s.get('cpu_causal_masks', 0))} | {g(c['act'])} | {g(p['activations'])} | "
            f"{c['r_act']:.2f} | {g(c['total'])} | {g(c['plan'].total)} | {c['r_total']:.2f} |")
    return "\n".join(lines)


def _has_mtp(r: dict) -> bool:
    return bool(load_run_config(ALL[r["name"]]).model.mtp_num_layers)


def details(results: list) -> str:
    """Per layout: the counted model state by kind, the plan's activation parts, what each part of
    the forward holds (measured vs plan, first micro-batch), timings."""
    g = lambda b: f"{b / UNIT[0]:.2f}"  # noqa: E731
    u = UNIT[1]
    layer_keys = ("norms", "MLA projections", "attention core", "dense MLPs", "router",
                  "MoE dispatch + experts")
    out = []
    for r in results:
        c, cnt, s0 = compare(r), r["counted"], r["steps"][0]
        ap = c["plan"].activation_parts
        plan_parts = ", ".join(f"{k} {g(v)}" for k, v in ap.items() if v)
        planned = {"input embedding": ap.get("input embedding", 0.0),
                   "layers": sum(ap.get(k, 0.0) for k in layer_keys)
                   + sum(v for k, v in ap.items() if k.startswith("layers (full")),
                   "MTP head": ap.get("MTP head", 0.0),
                   "LM head + loss": ap.get("LM head + loss", 0.0)}
        if r["first"] and r["micro_batches_run"] > 1:   # the plan's parts are x micro-batches in flight
            planned = {k: v / r["micro_batches_run"] for k, v in planned.items()}
        measured = group_parts(s0["parts"])
        by_part = ", ".join(f"{k} {g(v)} (plan {g(planned.get(k, 0.0))})" for k, v in measured.items())
        steps = "; ".join(
            f"step {i + 1}: fwd+bwd {s['fwd_bwd_s']:.0f} s, optimizer {s['opt_s']:.1f} s, peak "
            f"fwd+bwd {g(s['fwd_bwd_peak'])} {u} (at the end of the forward {g(s['fwd_peak'])}), "
            f"held {g(s['held'])}, optimizer step {g(s['opt_peak'])}, FFN experts/token "
            f"{s['ffn_experts_per_token']}, max/mean load {s['load_max_over_mean']}"
            for i, s in enumerate(r["steps"]))
        ranks = r["ranks"]
        out.append(
            f"* {r['name']} (rank {r['rank']} = TP {ranks['tp']}, PP {ranks['pp']}, CP {ranks['cp']}, "
            f"EP {ranks['ep']}, DP {ranks['dp']}; {cnt['params_on_rank'] / 1e6:,.1f}M parameters): "
            f"counted weights {g(cnt['weights'])}, grad buffers {g(cnt['gradients'])}, optimizer "
            f"{g(cnt['optimizer'])} {u}; RSS before the model {g(r['rss0'])} {u}. Plan activations: "
            f"{plan_parts}. Held after the first micro-batch's forward, by part ({u}): {by_part}. "
            f"Init {r['init_s']:.0f} s, build + first optimizer step {r['build_s']:.0f} s; {steps}; "
            f"wall {r['wall_s']:.0f} s, load average {r['load'][0]:.1f}, {r['threads']} thread(s).")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=None, choices=sorted(ALL),
                        help=f"default: {' '.join(DEFAULT_LAYOUTS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): " + " ".join(SMOKE))
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps measured per layout")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per layout")
    parser.add_argument("--no-write", action="store_true", help="print only (no docs/benchmarks.md)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(rehearse(args.worker, args.steps)))
        return 0
    names = args.layouts or (list(SMOKE) if args.smoke else list(DEFAULT_LAYOUTS))
    if all(n in SMOKE for n in names):
        global UNIT
        UNIT = (2 ** 20, "MiB")
    results = []
    for name in names:
        results.append(run_worker(name, args.steps, args.timeout))
        print(f"{name}: done in {results[-1]['wall_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    body = table(results) + "\n\n" + details(results)
    print(body)
    if not args.no_write and not args.smoke:
        from bench.report import append_section

        cmd = "python bench/one_rank_rehearsal.py" + (f" --layouts {' '.join(names)}"
                                                     if args.layouts else "") + \
              (f" --steps {args.steps}" if args.steps != 1 else "")
        text = f"Command: `{cmd}`. {METHOD}\n\n{body}\n"
        print("written to", append_section("One-rank rehearsal at real width vs the memory plan", text))
    return 0


METHOD = ("One rank of the layout at full width, reduced depth (1 layer per pipeline stage, MTP as "
          "shipped), in one process with torch's fake process group for the other ranks; bf16, "
          "megatron DDP + distributed optimizer, the recipe's recompute setting and micro-batch; "
          "forced-balanced routing (K_e FFN experts per token, round-robin); pipeline: 1F1B with "
          "the micro-batches in flight on the stage (min(PP - stage, m)). Model state counted "
          "tensor by tensor (RSS in brackets); activations = peak RSS of the step over the "
          "model-state RSS (glibc mmaps every block over 64 KiB); \"GPU terms\" subtracts the "
          "bottom-right causal masks that CPU SDPA materialises and keeps for the context-parallel "
          "chunks (CUDA's flash / memory-efficient kernels build none). Plan = "
          "`memory_plan.stage_plan` of the same stage, layout and depth. "
          "bench/one_rank_rehearsal.py's docstring lists what is faked.")


if __name__ == "__main__":
    raise SystemExit(main())
