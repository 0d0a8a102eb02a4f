"""bench/gpu_check.py --cpu: the one-GPU check's steps at tiny sizes on CPU (gloo, world size 1, bf16),
so that the GPU path's script cannot rot between the runs on a GPU.

Rows that fail until the lead's model fixes merge are strict xfails (AWAITING): when a fix lands
its row passes, the xfail turns into a failure, and the entry is to be removed here."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpu_check import ROOT, _bitwise_equal, _patterns, layer_flops, lite_layer_config

# Every row of the CPU run, by the start of its name (the CPU sizes: 3 + 2 steps).
ROWS = ["train 3 + save + resume 2", "export to HF", "bf16 Float16Module: routing state",
        "RoPE inv_freq fp32", "distributed optimizer: main params", "local experts pairwise distinct",
        "overlap_param_gather: every parameter", "5 steps with overlap_grad_reduce",
        "losses with both overlaps == both off", "Lite-width shortcut layer", "packed documents (8)",
        "per-document attention on cpu", "varlen == per-piece core attention",
        "varlen vs per-piece: Lite-width MLA block", "train.deterministic: two",
        "deterministic mode: Lite-width shortcut layer"]
AWAITING: dict = {}  # row -> why it must still fail (strict xfail); empty: every row passes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--cpu",
                           "--out", str(tmp / "out"), "--work", str(tmp / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.load(open(tmp / "out" / "gpu_check.json"))
    # exit 1 exactly when a row fails; the CPU run leaves docs/benchmarks.md alone
    assert proc.returncode == (0 if all(r["ok"] for r in out["rows"]) else 1)
    assert "| check | result |" in open(tmp / "out" / "gpu_check.md").read()
    return out


def test_gpu_check_cpu_mode_reports_every_step(report):
    names = [r["name"] for r in report["rows"]]
    assert [len([n for n in names if n.startswith(r)]) for r in ROWS] == [1] * len(ROWS), names
    assert len(names) == len(ROWS), names
    layer = next(r for r in report["rows"] if "step_ms" in r)
    assert layer["step_ms"] > 0 and 0 < layer["ffn_experts_per_token"] <= layer["topk"]


@pytest.mark.parametrize("row", [
    pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=AWAITING[r])) if r in AWAITING else r
    for r in ROWS])
def test_gpu_check_cpu_row_passes(report, row):
    found = next(r for r in report["rows"] if r["name"].startswith(row))
    assert found["ok"], found


def test_parameter_names_are_grouped_by_pattern():
    assert _patterns(["module.module.decoder.layers.0.mlp.router.weight", "decoder.layers.1.mlp.router.weight",
                      "embedding.post_projs.3.weight"]) == \
        "decoder.layers.*.mlp.router.weight (2), embedding.post_projs.*.weight (1)"


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
