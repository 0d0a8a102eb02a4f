"""The --dry-run memory plan: its activation estimate against the measured peak memory of CPU runs,
and the over-budget refusal.

Peak memory is measured in a fresh process whose glibc serves every allocation over 8 KiB with
mmap (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors: one warm-up training
step (gradients allocated), then the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and
the peak of the next forward + backward over the RSS before it is the step's activation peak.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.train_utils import ROOT

# Three small LongCat configs that stress different terms: MTP + N-gram-free baseline (fp32), a
# wider bf16 model, and a long sequence where the attention core dominates.
CONFIGS = {
    "fp32-mtp": dict(model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                num_experts=8, zero_expert_num=4, moe_router_topk=4, moe_ffn_hidden_size=32,
                                mtp_num_layers=1, vocab_size=512),
                     seq=512, micro_batch=2, bf16=False),
    "bf16-wide": dict(model=dict(num_layers=2, hidden_size=128, num_attention_heads=8, ffn_hidden_size=256,
                                 num_experts=16, zero_expert_num=8, moe_router_topk=6, moe_ffn_hidden_size=64,
                                 q_lora_rank=64, kv_lora_rank=32, vocab_size=512),
                      seq=256, micro_batch=4, bf16=True),
    "long-seq": dict(model=dict(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                num_experts=8, zero_expert_num=4, moe_router_topk=4, moe_ffn_hidden_size=32,
                                vocab_size=256),
                     seq=1536, micro_batch=1, bf16=False),
}


def run_config(spec: dict):
    """The RunConfig of a CONFIGS entry (LongCat MLA dims from tests/longcat_tiny.py unless set)."""
    import dataclasses

    from longcat_megatron.config import RunConfig
    from tests.longcat_tiny import tiny_config

    model = tiny_config(**dict(spec["model"], max_position_embeddings=spec["seq"]))
    cfg = RunConfig(model=model)
    cfg.data = dataclasses.replace(cfg.data, seq_length=spec["seq"], mock=True)
    cfg.train = dataclasses.replace(cfg.train, micro_batch_size=spec["micro_batch"],
                                    global_batch_size=spec["micro_batch"])
    cfg.optimizer = dataclasses.replace(cfg.optimizer, bf16=spec["bf16"])
    return cfg


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(names: list) -> None:
    """(In a fresh process) print, per config, the peak bytes of one training forward + backward
    over the RSS before it, after a warm-up step."""
    import gc

    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import build_model_chunk, transformer_config

    peaks = {}
    for name in names:
        spec = CONFIGS[name]
        cfg = run_config(spec)
        runtime.initialize(num_experts=cfg.model.num_experts)
        model = build_model_chunk(cfg.model, transformer_config(cfg.model, bf16=spec["bf16"]),
                                  pre_process=True, post_process=True).train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.model.vocab_size, (spec["micro_batch"], spec["seq"]), generator=g)
        labels = torch.roll(ids, -1, 1)

        def step():
            loss = model(ids, None, None, labels=labels)
            loss.float().sum().backward()

        step()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS:")
        step()
        peaks[name] = _status("VmHWM:") - before
        del model, step
        gc.collect()
    print(json.dumps(peaks))
    runtime.shutdown()


def measured_peaks(names: list) -> dict:
    from longcat_megatron.runtime import free_port

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="8192", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0", OMP_NUM_THREADS="1", LONGCAT_FORCE_CPU="1",
               TORCHDYNAMO_DISABLE="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", f"from tests.test_memory_plan import measure; measure({names!r})"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def code_backend() -> str:
    """The attention backend this code base runs (``eager`` before the field existed)."""
    from longcat_megatron.model.config import ModelConfig

    return getattr(ModelConfig(), "attention_backend", "eager")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_activation_estimate_within_25_percent_of_measured_cpu_peak():
    from longcat_megatron.memory_plan import activation_bytes
    from longcat_megatron.runtime import resolve_layout

    peaks = measured_peaks(list(CONFIGS))
    rows = []
    for name, spec in CONFIGS.items():
        planned = sum(activation_bytes(run_config(spec), resolve_layout(1), backend=code_backend()).values())
        rows.append((name, planned, peaks[name], planned / peaks[name]))
    report = "; ".join(f"{n}: planned {a / 2**20:.1f} MiB vs measured {b / 2**20:.1f} MiB ({r:.2f}x)"
                       for n, a, b, r in rows)
    assert all(0.75 <= r <= 1.25 for *_, r in rows), report
    print(report)


def _lite(**parallel):
    from longcat_megatron.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "longcat_flash_lite.yaml"), ["data.mock=true"])
    parallel = {"expert": 8, **parallel}  # the figures below are for EP8 on 256 ranks (the config: EP64)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)  # expert_tensor may predate its config field
    return cfg


def _plan(cfg, world):
    from longcat_megatron.memory_plan import memory_plan
    from longcat_megatron.planning import count_parameters
    from longcat_megatron.runtime import resolve_layout

    p = cfg.parallel
    layout = resolve_layout(world, p.tensor, p.pipeline, p.context, p.expert, p.virtual_pipeline,
                            cfg.model.num_experts, p.expert_tensor)
    return memory_plan(cfg, layout, count_parameters(cfg))


def test_ngram_tables_and_experts_are_divided_by_their_own_groups():
    """Weights differ by exactly the N-gram tables / experts over the group that holds them:
    tables over TP (partition tensor) or ETP x EP (tensor_data); experts over EP x ETP."""
    from longcat_megatron.planning import count_parameters

    counts = count_parameters(_lite())
    layers_w = 2  # bf16 weights; TP8, EP8 on 256 ranks
    by_tp = _lite(expert_tensor=8); by_tp.model.ngram.partition = "tensor"
    by_group = _lite(expert_tensor=8); by_group.model.ngram.partition = "tensor_data"
    diff = _plan(by_tp, 256).parts["weights"] - _plan(by_group, 256).parts["weights"]
    assert diff == pytest.approx(counts.ngram_tables * layers_w * (1 / 8 - 1 / 64))
    etp8, etp1 = _plan(_lite(expert_tensor=8), 256), _plan(_lite(expert_tensor=1), 256)
    # ETP 8 -> 1 with EP 8: experts (and tensor_data tables) per rank x 8, expert-DP 4 -> 32
    expert_like = counts.expert + counts.ngram_tables
    assert etp1.parts["weights"] - etp8.parts["weights"] == pytest.approx(expert_like * layers_w * (1 / 8 - 1 / 64))
    assert etp1.parts["optimizer"] - etp8.parts["optimizer"] == pytest.approx(
        expert_like * 12 * (1 / (8 * 32) - 1 / (64 * 4)), abs=1.0)


def test_over_budget_plan_exits_2_with_breakdown_and_force_goes_on(capsys):
    from longcat_megatron.planning import MemoryBudgetError, print_plan

    cfg = _lite()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 4096  # 4x the activations
    with pytest.raises(MemoryBudgetError,
                       match=r"needs [0-9.]+ GiB per rank but --gpu-memory-gb is 80, [0-9.]+ GiB usable "
                             r"per 80 GB GPU .*activations [0-9.]+, "):
        print_plan(cfg, 256)
    print_plan(cfg, 256, force=True)
    out = capsys.readouterr().out
    assert "WARNING (--force)" in out and "config OK" in out
    print_plan(_lite(), 256)  # the shipped layout fits
    assert "plan fits 80 GB GPUs" in capsys.readouterr().out
    with pytest.raises(MemoryBudgetError, match="--gpu-memory-gb is 20"):
        print_plan(_lite(), 256, gpu_memory_gb=20)


# ------------------------------------------------------------------ usable GPU memory, host RAM
def _recipe(model: str, stage: str, overrides=()):
    """The config a stage script launches (model config + stage file + overrides)."""
    from longcat_megatron.config import load_config
    from longcat_megatron.recipe import stage_overrides

    name = {"lite": "longcat_flash_lite", "flash": "longcat_flash"}[model]
    stage_file = os.path.join(ROOT, "configs", "stages", f"{model}_{stage}.yaml")
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                       stage_overrides(stage_file) + ["data.mock=true", *overrides])


def _layout(cfg, world):
    from longcat_megatron.runtime import resolve_layout

    p = cfg.parallel
    return resolve_layout(world, p.tensor, p.pipeline, p.context, p.expert, p.virtual_pipeline,
                          cfg.model.num_experts, p.expert_tensor)


def test_usable_gpu_memory_is_reported_capacity_minus_context_nccl_and_fragmentation():
    from longcat_megatron import memory_plan as mp

    flash = _layout(_recipe("flash", "pretrain"), 1024)  # TP8 PP4 EP32: TP, DPxCP, EP, EDP, world, 2 PP
    assert mp.nccl_communicators(flash) == 7
    assert mp.nccl_communicators(_layout(_recipe("lite", "pretrain"), 512)) == 5  # no PP
    usable, parts = mp.usable_gpu_gib(80, flash)
    assert parts["reported"] == pytest.approx(81559 / 1024)  # an H100 80GB reports 81,559 MiB
    assert parts["CUDA context + NCCL"] == pytest.approx(1.0 + 7 * 0.5)
    assert usable == pytest.approx((81559 / 1024 - 4.5) * 0.9)
    assert mp.usable_gpu_gib(141, flash)[1]["reported"] == pytest.approx(143771 / 1024, rel=2e-4)  # H200


def test_flash_pretraining_fits_80gb_only_with_its_selective_recompute():
    from longcat_megatron.memory_plan import GIB, memory_plan, usable_gpu_gib
    from longcat_megatron.planning import count_parameters

    shipped = _recipe("flash", "pretrain")
    assert shipped.train.recompute == "selective"
    layout = _layout(shipped, 1024)
    usable, _ = usable_gpu_gib(80, layout)
    num_micro = shipped.train.global_batch_size // (shipped.train.micro_batch_size * layout.data)
    need = memory_plan(shipped, layout, count_parameters(shipped), num_micro=num_micro).total / GIB
    bare = _recipe("flash", "pretrain", ["train.recompute=none"])
    need_bare = memory_plan(bare, layout, count_parameters(bare), num_micro=num_micro).total / GIB
    assert need < usable < need_bare < 80, (need, usable, need_bare)


def test_dp_rank_0_ranks_per_node_follow_megatrons_groups():
    """The analytic count of data-parallel-rank-0 ranks on the first node of a pipeline stage (where
    megatron's mem_efficient gather puts the state) against megatron's own rank groups; no node
    holds more of them than the first."""
    from megatron.core.parallel_state import RankGenerator

    from longcat_megatron.memory_plan import _dp0_ranks_on_first_node
    from longcat_megatron.runtime import resolve_layout

    for world, tp, pp, cp, ep, etp in [(512, 8, 1, 1, 64, 1), (512, 8, 1, 8, 64, 1),
                                       (1024, 8, 4, 1, 32, 1), (1024, 8, 4, 4, 32, 1),
                                       (256, 4, 2, 1, 2, 4), (64, 2, 1, 2, 4, 1)]:
        layout = resolve_layout(world, tp, pp, cp, ep, None, 512, etp)
        dense0 = {g[0] for g in RankGenerator(tp, 1, layout.data, pp, cp, "tp-cp-ep-dp-pp").get_ranks("dp-cp")}
        expert0 = {g[0] for g in RankGenerator(etp, ep, layout.expert_data, pp, 1,
                                               "tp-cp-ep-dp-pp").get_ranks("dp")}
        nodes = [range(n, n + 8) for n in range(0, world, 8)]
        counts = [(len(dense0 & set(r)), len(expert0 & set(r))) for r in nodes]
        assert _dp0_ranks_on_first_node(layout, 8) == counts[0], (world, tp, pp, cp, ep, etp)
        assert max(counts) == counts[0]
        stage = world // pp
        assert all(counts[s // 8] == counts[0] for s in range(0, world, stage))


@pytest.mark.parametrize("model, world, stages", [
    ("lite", 512, ["pretrain", "midtrain_32k", "midtrain_128k", "sft"]),
    ("flash", 1024, ["pretrain", "midtrain_32k", "midtrain_128k", "sft"]),
])
def test_checkpoint_host_ram_per_param_is_a_fraction_of_megatrons(model, world, stages):
    from longcat_megatron.memory_plan import GIB, host_plan
    from longcat_megatron.planning import count_parameters

    for stage in stages:
        cfg = _recipe(model, stage)
        assert cfg.checkpoint.optimizer_gather == "per_param" and cfg.checkpoint.fully_parallel_load
        layout, counts = _layout(cfg, world), count_parameters(cfg)
        plans = {g: host_plan(cfg, layout, counts, gather=g) for g in ("per_param", "all_ranks", "dp_rank_0")}
        ours, default, mem_efficient = plans["per_param"], plans["all_ranks"], plans["dp_rank_0"]
        # megatron's mem_efficient gather does not help the worst node: the first node of a stage
        # holds DP-rank 0 of every group, and the writer copies its views once more
        assert "8 of the node's 8 ranks are DP-rank 0 of a dense group" in mem_efficient.node_note
        assert mem_efficient.save_node > default.save_node > 2.5 * ours.save_node
        assert default.load_node > 2.5 * ours.load_node
        assert ours.save_node < 128 * GIB and ours.load_node < 128 * GIB, (model, stage)


def test_host_memory_budget_refuses_and_force_warns(capsys):
    from longcat_megatron.planning import HostMemoryError, print_plan

    cfg = _recipe("lite", "pretrain", ["checkpoint.host_memory_gb=40"])
    with pytest.raises(HostMemoryError, match=r"need [0-9]+ GiB of host RAM on the worst node but "
                                              r"checkpoint.host_memory_gb is 40"):
        print_plan(cfg, 512)
    print_plan(cfg, 512, force=True)
    out = capsys.readouterr().out
    assert "WARNING (--force)" in out and "host RAM for checkpoints" in out
    print_plan(_recipe("lite", "pretrain", ["checkpoint.host_memory_gb=256"]), 512)
    assert "WARNING" not in capsys.readouterr().out
