"""Rehearsal of every shipped recipe's settings on 4 gloo processes.

Each case is a real recipe (``configs/longcat_flash{,_lite}.yaml`` + its stage file, read the way
``launch/*.sh`` reads them), scaled down in width, depth and sizes only: precision (bf16),
optimizer (megatron's distributed optimizer), both DDP overlaps, expert implementation and
dispatcher, N-gram partition, RoPE/YaRN, recompute, document masks, async save and the checkpoint
format stay as shipped. The parallel layout keeps the recipe's kinds of parallelism at 4 ranks:
TP2 + SP, EP2 x ETP1 with expert-data-parallel replicas (2), data-parallel replicas (DP2, or CP2
for the stages that use context parallelism, whose replicas are DP x CP), a small DDP bucket so
that the multi-bucket paths of the real sizes are taken. Flash's PP4 is not rehearsed here (4
ranks cannot hold PP with DP > 1 and expert-DP > 1; pipeline parity is tests/test_parallel_parity.py).

Checked for each recipe:
* at build: every state meant to be full precision (routing state, rotary frequencies, the
  optimizer's main parameters) is fp32/fp64; the FFN experts are pairwise distinct over all EP ranks;
* every step: the data-parallel and expert-data-parallel replicas of every parameter hold bitwise
  the same values as the forward read them (``train.check_replicas_interval=1``), and the
  silent-data-corruption replay of micro-batch 0 (``train.sdc_check_interval=1``, deterministic
  mode, the shipped ``train.rerun_mode=validate_results``) finds no difference;
* losses equal the same run with both overlaps off (the reduce buckets differ, so the gradient
  norm is summed in another order: relative 1e-5);
* checkpoints saved (async, as shipped) while the run goes on; after a "kill" that leaves only the
  first commit, the resume equals the straight run bitwise (losses and weights).
"""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.harness import run_distributed
from tests.train_utils import ROOT

CONFIGS = {"lite": f"{ROOT}/configs/longcat_flash_lite.yaml", "flash": f"{ROOT}/configs/longcat_flash.yaml"}
STAGES = ["pretrain", "midtrain_32k", "midtrain_128k", "sft"]
# Sequence lengths of the stages, scaled: 8k -> 64, 32k -> 128, 128k -> 256 (YaRN's original
# context 32k -> 128, so the 128k stages extrapolate as the real ones do).
SEQ = {"pretrain": 64, "midtrain_32k": 128, "midtrain_128k": 256, "sft": 256}
ITERS = 2
SAVE_AT = 1
OFF_ITERS = 2  # steps compared with both overlaps off
BUCKET = 20000  # parameters per DDP bucket: several dense and expert buckets at these sizes


def _sizes(model: str) -> list[str]:
    """Width, depth and sizes of the scaled-down model (everything else as shipped)."""
    out = [
        "model.num_layers=1", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
        "model.vocab_size=512", "model.num_experts=8", "model.zero_expert_num=4",
        "model.moe_router_topk=4", "model.budget_target_ffn_experts=2.0",
        "model.moe_ffn_hidden_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
        "model.init_method_std=0.05", "model.yarn_original_max_position_embeddings=128",
        "model.max_position_embeddings=1280",
    ]
    if model == "lite":  # 12 N-gram tables (N=4, K=4 as shipped) of width 96/12 = 8
        out += ["model.hidden_size=96", "model.ngram.ngram_vocab_size_ratio=3.3"]
    else:
        out += ["model.hidden_size=64"]
    return out


def _layout(stage_overrides: list[str]) -> list[str]:
    """The recipe's kinds of parallelism at 4 ranks."""
    cp = any(o.startswith("parallel.context=") for o in stage_overrides)
    return [
        "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=1",
        "parallel.expert=2", "parallel.expert_tensor=1", f"parallel.context={2 if cp else 1}",
        f"parallel.ddp_bucket_size={BUCKET}",
    ]


def recipe_overrides(model: str, stage: str, data: dict) -> list[str]:
    """Stage file + scaled sizes + 4-rank layout + rehearsal run settings."""
    from longcat_megatron.recipe import stage_overrides

    staged = stage_overrides(f"{ROOT}/configs/stages/{model}_{stage}.yaml")
    dp = 1 if any(o.startswith("parallel.context=") for o in staged) else 2
    gbs = 2 * dp  # micro-batch 1 as shipped, 2 micro-batches per step
    run = [
        f"data.seq_length={SEQ[stage]}", f"train.global_batch_size={gbs}",
        f"train.train_iters={ITERS}", "schedule.warmup_iters=1", "schedule.wsd_decay_iters=1",
        "logging.tensorboard_dir=null", "train.check_replicas_interval=1",
        # the opt-in silent-data-corruption replay (needs deterministic mode) at the shipped settings:
        # a false alarm under the overlaps, bf16 or expert parallelism would stop the run (exit 78)
        "train.deterministic=true", "train.sdc_check_interval=1",
    ]
    if any(o.startswith("train.batch_schedule=") for o in staged):  # the raise, after step 1
        run.append(f"train.batch_schedule=['{gbs * SEQ[stage]}:{2 * gbs}']")
    if stage == "sft":
        run += [f"data.paths=['{data['sft']}']", "data.mock=false", "data.split='90,10,0'"]
    else:
        run += ["data.mock=true", "data.mock_vocab_size=512"]
    return staged + _sizes(model) + _layout(staged) + run


# ------------------------------------------------------------------------------ per-rank bodies
def _full_precision_problems(model_chunks, optimizer) -> list[str]:
    """Names of state meant to stay full precision that is not."""
    import torch

    from longcat_megatron.model.full_precision import full_precision_state

    problems = [f"{name}: {t.dtype}" for chunk in model_chunks
                for name, t in full_precision_state(chunk).items()
                if t.dtype not in (torch.float32, torch.float64)]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            problems += [f"optimizer main param {tuple(p.shape)}: {p.dtype}"
                         for p in group["params"] if p.dtype != torch.float32]
    return problems


def _global_experts(model_chunks) -> list:
    """Every FFN expert's weights over the EP group: [(layer, global expert, fc1, fc2)]."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from longcat_megatron.model.experts import local_expert_weights
    from longcat_megatron.training.setup import unwrap

    group = ps.get_expert_model_parallel_group()
    out = []
    for chunk in model_chunks:
        for name, module in unwrap(chunk).named_modules():
            weights = local_expert_weights(module)
            if weights is None:
                continue
            fc1, fc2 = (torch.stack(w).float() for w in weights)
            parts = []
            for local in (fc1, fc2):
                gathered = [torch.empty_like(local) for _ in range(group.size())]
                dist.all_gather(gathered, local.contiguous(), group=group)
                parts.append(torch.cat(gathered))
            out.append((name, parts[0], parts[1]))
    return out


def _build_checks(model, optimizer) -> dict:
    """The model and optimizer as training built them, before the first step."""
    same = []
    for name, fc1, fc2 in _global_experts(model):
        for i in range(fc1.shape[0]):
            for j in range(i):
                if (fc1[i] == fc1[j]).all() or (fc2[i] == fc2[j]).all():
                    same.append(f"{name}: experts {j} and {i}")
    return {"full_precision": _full_precision_problems(model, optimizer), "same_experts": same}


def _train_with_build_checks(overrides: list[str], config: str) -> tuple[dict, dict]:
    """``run_training``, with :func:`_build_checks` run where the loop has just built the model and
    its optimizer (the training loop's own objects, no second build)."""
    from longcat_megatron.training import loop
    from tests.train_utils import run_training

    build_optimizer, checks = loop.build_optimizer, {}

    def checked(cfg, chunks):
        optimizer = build_optimizer(cfg, chunks)
        checks.update(_build_checks(chunks, optimizer))
        return optimizer

    loop.build_optimizer = checked
    try:
        return run_training(overrides, config), checks
    finally:
        loop.build_optimizer = build_optimizer


CONFIG_OF = {}  # filled per process: the first override names the model family


def _rehearse(overrides: list[str], ckpt: str) -> dict:
    """Build checks; the recipe's run with its checkpoints (async as shipped) every SAVE_AT steps;
    the same with both overlaps off; then a "kill" after the first commit (later checkpoints
    removed, the tracker back at SAVE_AT, as a crash during step SAVE_AT + 1 leaves it) and a
    resume from it."""
    import shutil

    import torch.distributed as dist

    from longcat_megatron.training import checkpointing as ckpt_io
    from tests.train_utils import run_training

    config = CONFIG_OF[overrides[0]]
    on = overrides[1:] + [f"checkpoint.save={ckpt}", f"checkpoint.save_interval={SAVE_AT}"]
    off = overrides[1:] + ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
                           "model.scmoe_overlap=false", f"train.exit_interval={OFF_ITERS}"]
    out = {}
    out["on"], out["build"] = _train_with_build_checks(on, config)
    out["off"] = run_training(off, config)
    if dist.get_rank() == 0:
        for it in ckpt_io.list_iterations(ckpt):
            if it > SAVE_AT:
                shutil.rmtree(ckpt_io.iteration_dir(ckpt, it))
        ckpt_io._write_tracker(ckpt, SAVE_AT)
    dist.barrier()
    out["resumed"] = run_training(on, config)
    return out


def _rehearse_all(cases: list, root: str) -> dict:
    for model, path in CONFIGS.items():
        CONFIG_OF[model] = path
    return {name: _rehearse([model] + overrides, os.path.join(root, name))
            for name, model, overrides in cases}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Packed chat data (ids + loss masks) at the SFT stage's scaled length."""
    from data_tools.sft import preprocess_sft
    from data_tools.tiny_corpus import build_tiny_corpus

    d = tmp_path_factory.mktemp("rehearsal_sft")
    build_tiny_corpus(str(d / "tiny"), vocab_size=512, max_mb=0.1)
    rng = random.Random(0)
    words = "the a cat dog sat on mat ran fast slow red blue and or but".split()
    with open(d / "chats.jsonl", "w") as f:
        for _ in range(160):
            msgs = []
            for _ in range(rng.randint(1, 2)):
                msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 6)))})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 8)))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    preprocess_sft([str(d / "chats.jsonl")], str(d / "tiny" / "tokenizer"), str(d / "sft"),
                   seq_length=SEQ["sft"])
    return {"sft": str(d / "sft")}


def _check(name: str, results: list) -> None:
    r0 = results[0]
    assert r0["build"]["full_precision"] == [], (name, r0["build"]["full_precision"])
    assert r0["build"]["same_experts"] == [], (name, r0["build"]["same_experts"][:4])
    on, off, resumed = r0["on"], r0["off"], r0["resumed"]
    assert sorted(on["losses"]) == list(range(1, ITERS + 1)), name
    assert sorted(off["losses"]) == list(range(1, OFF_ITERS + 1)), name
    for it, loss in off["losses"].items():
        assert abs(loss - on["losses"][it]) <= 1e-5 * abs(loss), (name, it, on["losses"][it], loss)
    assert resumed["resumed_from"] == SAVE_AT, name
    for rank, r in enumerate(results):
        assert r["resumed"]["losses"] == {k: v for k, v in r["on"]["losses"].items() if k > SAVE_AT}, (name, rank)
        for k, v in r["on"]["weights"].items():
            assert r["resumed"]["weights"][k].equal(v), (name, rank, k)


def test_recipe_settings_rehearsed(sft_data, tmp_path):
    """All 8 recipes (both models, four stages each) in one 4-process run (one start-up)."""
    cases = [(f"{model}_{stage}", model, recipe_overrides(model, stage, sft_data))
             for model in CONFIGS for stage in STAGES]
    results = run_distributed(_rehearse_all, 4, cases, str(tmp_path), timeout=1200)
    for name, _, _ in cases:
        _check(name, [r[name] for r in results])
