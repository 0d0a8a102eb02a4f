"""bf16 leaves the router's state alone (issue: Float16Module cast the expert bias, the pick counts,
the controller's errors and the fp32 router weight to bf16, so counts stopped being integers and the
controller stalled). One 2-process gloo job (DP=2, 2 micro-batches per rank, tiny LongCat with zero
experts and the budget controller) trains bf16 20 steps straight (saving at 10 and 20), resumes bf16
from iteration 10 to 20, and trains fp32 20;
the collective audit of tests/test_collectives.py watches the bf16 run.
"""

from __future__ import annotations

import os

import torch

from tests.harness import run_distributed
from tests.test_collectives import check_collective_audit, install_collective_audit

CONFIG = "configs/tiny_longcat.yaml"
SEQ, GBS = 32, 8
BASE = ["parallel.tensor=1", "parallel.sequence_parallel=false", "model.mtp_num_layers=0",
        f"data.seq_length={SEQ}", "train.micro_batch_size=2", f"train.global_batch_size={GBS}",
        "train.train_iters=20", "schedule.warmup_iters=3", "parallel.distributed_optimizer=true"]
# bf16 and fp32 runs start from the same weights; bf16 rounding of activations moves the loss by
# ~1e-3 over 20 steps at this size (measured: max |diff| 1.8e-3): 2e-2 leaves headroom
# while a broken bf16 path (e.g. a stalled router or a wrong loss scale) is far outside it.
LOSS_TOLERANCE = 2e-2


def _train(overrides: list, trace: dict | None = None):
    from longcat_megatron.config import load_config
    from longcat_megatron.model.budget_controller import BudgetController
    from longcat_megatron.model.router import ZeroExpertRouter
    from longcat_megatron.training.loop import train

    step_orig, end_orig = BudgetController.step, ZeroExpertRouter.end_step
    if trace is not None:
        def step(self, ffn_counts, tokens):
            trace.setdefault("counts", []).append((ffn_counts.clone(), tokens))
            return step_orig(self, ffn_counts, tokens)

        def end_step(self):
            out = end_orig(self)
            trace.setdefault("bias", {}).setdefault(self.layer_number, []).append(
                self.expert_bias.clone())
            return out

        BudgetController.step, ZeroExpertRouter.end_step = step, end_step
    try:
        result = train(load_config(CONFIG, BASE + overrides))
    finally:
        BudgetController.step, ZeroExpertRouter.end_step = step_orig, end_orig
    return result


def _weights(result) -> dict:
    return {k: v.detach().clone() for k, v in result.model_chunks[0].module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _job(ckpt: str):
    from longcat_megatron import runtime
    from longcat_megatron.training.checkpointing import TRACKER
    from longcat_megatron.training.setup import unwrap

    runtime.initialize()
    trace: dict = {}
    records = install_collective_audit()
    saving = ["optimizer.bf16=true", f"checkpoint.save={ckpt}", "checkpoint.save_interval=10"]
    straight = _train(saving, trace)
    model = unwrap(straight.model_chunks[0])
    dtypes = {}
    for name, router in model.routers():
        for key, t in list(router.named_parameters()) + list(router.named_buffers()):
            dtypes[f"layer{name}.{key}"] = t.dtype
    some_linear = model.decoder.layers["0"].mlps_0.linear_fc1.weight.dtype
    # Move the commit point back to iteration 10: the next run resumes there and redoes 11..20.
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(ckpt, TRACKER), "w") as f:
            f.write("10\n")
    torch.distributed.barrier()
    resumed = _train(saving)
    fp32 = _train([])
    check_collective_audit(records, str(runtime.device()))
    return {
        "dtypes": dtypes, "linear_dtype": some_linear, "trace": trace,
        "losses": straight.losses, "weights": _weights(straight),
        "resumed_losses": resumed.losses, "resumed_from": resumed.resumed_from,
        "resumed_weights": _weights(resumed), "fp32_losses": fp32.losses,
    }


def test_bf16_router_state_counts_trajectory_resume_and_loss(tmp_path):
    from longcat_megatron.model.budget_controller import BudgetController
    from longcat_megatron.model.config import ModelConfig

    out = run_distributed(_job, 2, str(tmp_path / "ckpt"), timeout=480)
    r = out[0]
    # Wrapping cast the model to bf16 but not the router/controller state.
    assert r["linear_dtype"] == torch.bfloat16
    assert r["dtypes"] and all(dt in (torch.float32, torch.float64, torch.int64)
                               for dt in r["dtypes"].values()), r["dtypes"]
    assert r["dtypes"]["layer0.weight"] == torch.float32
    assert r["dtypes"]["layer0.expert_bias"] == torch.float32
    assert r["dtypes"]["layer0.controller.prev_error"] == torch.float64
    # The controller saw the optimizer step's global counts: every token of the global batch (both
    # DP ranks, both micro-batches) once per step, as exact integers.
    counts = r["trace"]["counts"]
    assert len(counts) == 2 * 20
    for ffn, tokens in counts:
        assert tokens == GBS * SEQ
        assert torch.equal(ffn, ffn.round()) and 0 < float(ffn.sum()) <= 4 * tokens
    # The bias trajectory equals the fp32 controller replayed on the same counts, bitwise.
    cfg = ModelConfig(arch="longcat", hidden_size=64, num_attention_heads=4, num_experts=8,
                      zero_expert_num=4, moe_router_topk=4, budget_target_ffn_experts=2.0,
                      budget_rate=0.1)
    for layer, biases in r["trace"]["bias"].items():
        controller, bias = BudgetController(cfg), torch.zeros(12, dtype=torch.float32)
        layer_counts = counts[layer::2]
        for step, (ffn, tokens) in enumerate(layer_counts):
            bias[:8] += controller.step(ffn, tokens).float()
            assert torch.equal(bias, biases[step]), (layer, step)
        assert float(bias.abs().max()) > 0
    # bf16 resume is bitwise.
    assert r["resumed_from"] == 10
    assert r["resumed_losses"] == {i: r["losses"][i] for i in range(11, 21)}
    for k, v in r["weights"].items():
        assert torch.equal(v, r["resumed_weights"][k]), k
    # bf16 tracks fp32.
    diffs = [abs(r["losses"][i] - r["fp32_losses"][i]) for i in r["losses"]]
    print(f"bf16 vs fp32 loss: max |diff| {max(diffs):.2e} over {len(diffs)} steps")
    assert max(diffs) < LOSS_TOLERANCE, diffs
    assert r["losses"][20] < r["losses"][1]
