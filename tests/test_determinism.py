"""Deterministic computation (``train.deterministic``, training/determinism.py).

* Two 1-process runs of the tiny LongCat with the N-gram Embedding (its table gradient is the
  project's one scatter-add, ``index_add_``), bf16 and the distributed optimizer, same seed,
  deterministic mode on: losses, gradient norms and every final parameter bitwise equal, with torch's
  deterministic algorithms, cuBLAS workspace, NCCL algorithm and megatron's deterministic_mode set.
  (On CPU the kernels are deterministic anyway: what this proves is that nothing in the loop, the
  data or the N-gram path depends on anything but the seed, and that the deterministic mode is
  accepted by every op the model runs. bench/gpu_check.py repeats it on CUDA.)
* No scatter-add exists in project code beyond the reviewed ``index_add_`` calls (a new one must be
  checked for a deterministic path before it is added here).
* A non-deterministic NCCL_ALGO with ``train.deterministic`` is a clear error.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")
OVERRIDES = ["parallel.tensor=1", "parallel.sequence_parallel=false", "data.seq_length=32",
             "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=3",
             "schedule.warmup_iters=1", "optimizer.bf16=true", "parallel.distributed_optimizer=true",
             "train.deterministic=true"]
# The scatter-adds of project code and why each is deterministic under train.deterministic.
REVIEWED_SCATTER_ADDS = {
    ("longcat_megatron/model/ngram_embedding.py", "main_grad.index_add_("): "torch: deterministic index_add",
    ("longcat_megatron/model/ngram_embedding.py", "dense.index_add_("): "torch: deterministic index_add",
    ("ckpt_convert/hf_remote/modeling_longcat_ngram.py", "out.index_add_("): "HF inference code, not training",
}


def _twice() -> dict:
    import torch

    from longcat_megatron.config import load_config
    from longcat_megatron.training import loop

    runs = []
    for _ in range(2):
        r = loop.train(load_config(CONFIG, OVERRIDES))
        params = {n: p.detach().float().clone() for n, p in r.model_chunks[0].named_parameters()}
        runs.append((r.losses, r.grad_norms, params, r.model_chunks[0].config.deterministic_mode))
    return {"runs": runs, "torch": torch.are_deterministic_algorithms_enabled(),
            "env": {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO",
                                                   "NVTE_ALLOW_NONDETERMINISTIC_ALGO")}}


@pytest.fixture(scope="module")
def twice():
    return run_distributed(_twice, 1)[0]


def test_two_runs_with_the_same_seed_are_bitwise_equal(twice):
    import torch

    (loss_a, norm_a, params_a, mode_a), (loss_b, norm_b, params_b, mode_b) = twice["runs"]
    assert sorted(loss_a) == [1, 2, 3] and loss_a == loss_b and norm_a == norm_b
    assert params_a.keys() == params_b.keys() and any("ngram" in n for n in params_a)
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    assert mode_a and mode_b  # megatron's TransformerConfig.deterministic_mode


def test_deterministic_mode_sets_torch_cublas_nccl_and_te(twice):
    assert twice["torch"] is True
    assert twice["env"] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring",
                            "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def test_no_unreviewed_scatter_add_in_project_code():
    pattern = re.compile(r"\b(?:\w+\.)*(index_add_?|scatter_add_?|scatter_reduce_?|index_put_?|put_)\(|accumulate=True")
    found = set()
    for folder in ("longcat_megatron", "ckpt_convert", "data_tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)
                for line in open(path):
                    code = line.split("#", 1)[0]
                    for m in pattern.finditer(code):
                        found.add((rel, m.group(0)))
    assert found == set(REVIEWED_SCATTER_ADDS), found - set(REVIEWED_SCATTER_ADDS)


def test_non_deterministic_nccl_algo_is_a_clear_error(monkeypatch):
    from longcat_megatron.config import ConfigError
    from longcat_megatron.training import determinism

    monkeypatch.setenv("NCCL_ALGO", "NVLS")
    with pytest.raises(ConfigError, match="NCCL_ALGO=NVLS"):
        determinism.configure(True)
    assert determinism.configure(False) == []
