"""bench/gpu_check.py --cpu: the one-GPU check's steps at tiny sizes on CPU (gloo, world size 1, bf16),
so that the GPU path's script cannot rot between the runs on a GPU."""

import json
import os
import subprocess
import sys

import torch

from bench.gpu_check import ROOT, _bitwise_equal, layer_flops, lite_layer_config


def test_gpu_check_cpu_mode_passes_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--cpu",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(tmp_path / "out" / "gpu_check.json"))
    names = [r["name"] for r in report["rows"]]
    assert any(n.startswith("train 3 + save + resume 2") for n in names)
    assert any(n.startswith("export to HF") for n in names)
    assert any(n.startswith("packed documents") for n in names)
    layer = next(r for r in report["rows"] if "step_ms" in r)
    assert layer["step_ms"] > 0 and 0 < layer["ffn_experts_per_token"] <= layer["topk"]
    assert all(r["ok"] for r in report["rows"]), report["rows"]
    # The CPU run leaves docs/benchmarks.md alone (only a GPU run appends its table).
    assert "| check | result |" in open(tmp_path / "out" / "gpu_check.md").read()


def test_bitwise_compare_sees_signed_zero_and_dtype():
    assert _bitwise_equal(torch.tensor([1.5, 0.0]), torch.tensor([1.5, 0.0]))
    assert not _bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))  # torch.equal says equal
    assert not _bitwise_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.bfloat16))


def test_layer_flops_matmul_part_equals_twice_the_matmul_parameters():
    """At s=1 (one key per query) the FLOPs are 2 x the weights a token multiplies plus the one-key
    attention core; the weights come from param_count's total (checked against the built model)."""
    from longcat_megatron.model.param_count import total_parameters

    cfg = lite_layer_config({"experts": 8, "zero_experts": 4, "seq": 16}, cpu=True)
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    per_expert = 3 * h * cfg.moe_ffn_hidden_size
    vectors = 4 * h + 2 * (cfg.q_lora_rank + cfg.kv_lora_rank)  # the layer's RMSNorm weights
    weights = (total_parameters(cfg) - 2 * cfg.vocab_size * h - h - vectors
               - cfg.num_experts * per_expert)
    core = 2 * 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim)  # two attentions, one key
    assert layer_flops(cfg, 1, ffn_picks=3) == 2 * weights + core + 2 * 3 * per_expert
