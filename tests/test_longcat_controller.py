"""Budget controller: on a stream biased toward zero experts it steers the mean number of FFN
experts per token to K_e and balances the FFN experts; its state survives save/resume exactly."""

import io

import torch

from tests.harness import run_distributed
from tests.longcat_tiny import tiny_config

TARGET, TOPK, N, Z = 2.0, 4, 8, 4


def _router(**overrides):
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.router import ZeroExpertRouter

    settings = dict(arch="longcat", hidden_size=16, num_attention_heads=2, num_experts=N,
                    zero_expert_num=Z, moe_router_topk=TOPK, budget_target_ffn_experts=TARGET,
                    budget_rate=0.05, budget_rate_decay=0.997)
    cfg = ModelConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    router = ZeroExpertRouter(cfg, transformer_config(cfg)).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[N:, 0] += 3.0     # zero experts favoured by the stream's feature 0
        router.weight[0, 1] += 2.0      # FFN expert 0 favoured by feature 1
    return router


def _tokens(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(512, 1, 16, generator=g)
    x[..., 0] += 1.0
    x[..., 1] += 0.5
    return x


def _run(router, steps, start=0):
    """Route ``steps`` batches; returns the pick counts summed over the last 100 steps."""
    recent = torch.zeros(N + Z, dtype=torch.float64)
    for step in range(start, start + steps):
        router.route(_tokens(step))
        if step >= start + steps - 100:
            recent += router.step_picks
        router.end_step()
    return recent


def test_uncontrolled_stream_is_far_from_target():
    router = _router(budget_target_ffn_experts=None)
    picks = _run(router, 100)
    tokens = 100 * 512
    assert picks[:N].sum() / tokens < 0.6 * TARGET


def test_controller_reaches_budget_and_balances():
    router = _router()
    picks = _run(router, 800)
    tokens = 100 * 512
    per_token = float(picks[:N].sum() / tokens)
    load = picks[:N] / picks[:N].mean()
    print(f"FFN experts/token {per_token:.3f} (target {TARGET}), max/mean load {float(load.max()):.3f}")
    assert abs(per_token - TARGET) / TARGET < 0.05
    assert float(load.max()) < 1.5
    assert torch.all(router.expert_bias[N:] == 0)   # zero experts' bias never moves


def test_resume_is_exact():
    straight = _router()
    _run(straight, 300)
    first = _router()
    _run(first, 150)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = _router()
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    _run(resumed, 150, start=150)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert int(resumed.controller.steps) == 300


def _checkpoint_round_trip(path):
    import os

    import torch
    from megatron.core import dist_checkpointing

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize()
    cfg = tiny_config(budget_target_ffn_experts=2.0)
    model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    pos = torch.arange(8)[None].expand(2, -1)
    model(ids, pos, None, labels=ids)
    model.on_train_step_end(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()
             if "router" in k and isinstance(v, torch.Tensor)}
    keys = sorted(k for k in model.sharded_state_dict() if "router" in k)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)
    fresh = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), path))
    same = all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    moved = float(saved["decoder.layers.0.mlp.router.expert_bias"].abs().sum())
    return same, moved, keys


def test_controller_state_in_distributed_checkpoint(tmp_path):
    same, moved, keys = run_distributed(_checkpoint_round_trip, 1, str(tmp_path / "ckpt"))[0]
    assert moved > 0
    assert "decoder.layers.0.mlp.router.controller.prev_error" in keys
    assert "decoder.layers.0.mlp.router.expert_bias" in keys
    assert same


def test_activation_recomputation_counts_each_token_once():
    """A forward re-run inside the backward pass (activation recomputation, reentrant or not) adds
    nothing to the step's counts, so the controller sees each routed token once."""
    import pytest
    from torch.utils.checkpoint import checkpoint

    reference = _router()
    reference.route(_tokens(0))
    for reentrant in (True, False):
        router = _router()
        x = _tokens(0).requires_grad_(True)
        out = checkpoint(lambda t: router.route(t).ffn_probs.sum(), x, use_reentrant=reentrant)
        out.backward()
        assert x.grad is not None
        assert torch.equal(router.step_picks, reference.step_picks), reentrant
        assert float(router.step_tokens) == pytest.approx(512)
