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
                       match=r"needs [0-9.]+ GiB per rank but --gpu-memory-gb is 80 .*activations [0-9.]+, "):
        print_plan(cfg, 256)
    print_plan(cfg, 256, force=True)
    out = capsys.readouterr().out
    assert "WARNING (--force)" in out and "config OK" in out
    print_plan(_lite(), 256)  # the shipped layout fits
    assert "plan fits 80 GiB" in capsys.readouterr().out
    with pytest.raises(MemoryBudgetError, match="--gpu-memory-gb is 20"):
        print_plan(_lite(), 256, gpu_memory_gb=20)
