"""Grouped-GEMM experts == SequentialMLP (fp32 <= 1e-6, experts with zero tokens included; bf16
close), and selective recompute of the expert activation gives the same gradients. (Resume across
implementations: tests/test_moe_layouts.py.)"""

from tests.harness import run_distributed
from tests.longcat_tiny import tiny_config
from tests.train_utils import ROOT


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _experts(impl, tf, n_local, weights=None):
    from longcat_megatron.model.experts import experts_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.process_groups_config import ProcessGroupCollection

    module = build_module(experts_spec(impl, n_local), n_local, tf,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    if weights is not None:
        module.load_state_dict(weights)
    return module


def per_expert_grads(named_parameters) -> dict:
    """Gradients by SequentialMLP's names (the grouped experts' stacked ones split per expert)."""
    from longcat_megatron.model.parallel_slicing import split_stacked_experts

    return dict(split_stacked_experts((n, p.grad) for n, p in named_parameters))


def _run(module, x, probs, counts):
    import torch

    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, _ = module(x, torch.tensor(counts), probs)
    g = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
    grads = {"x": x.grad, "probs": probs.grad, **per_expert_grads(module.named_parameters())}
    return out.detach(), grads


def _module_parity():
    """Module level: 4 local experts, tokens [5, 0, 7, 0] (two experts receive nothing)."""
    import dataclasses

    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config

    runtime.initialize(seed=3)
    cfg = tiny_config(num_experts=4, hidden_size=32, moe_ffn_hidden_size=16)
    tf = transformer_config(cfg)
    counts = [5, 0, 7, 0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 32, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    seq = _experts("sequential", tf, 4)
    weights = seq.state_dict()
    out = {}
    ref_out, ref_grads = _run(seq, x, probs, counts)
    grouped = _experts("grouped", tf, 4, weights)
    assert set(grouped.state_dict()) == set(weights)            # same checkpoint keys
    got_out, got_grads = _run(grouped, x, probs, counts)
    out["fp32_out"] = _rel(got_out, ref_out)
    out["fp32_grads"] = max(_rel(got_grads[k], ref_grads[k]) for k in ref_grads)
    out["zero_expert_grads"] = float(sum(got_grads[f"local_experts.{e}.linear_fc{f}.weight"].abs().sum()
                                         for e in (1, 3) for f in (1, 2)))
    # selective recompute of the SwiGLU activation: the same gradients, bitwise
    tf_rc = dataclasses.replace(tf, recompute_granularity="selective", recompute_modules=["moe_act"])
    rc = _experts("grouped", tf_rc, 4, weights)
    assert rc.recompute_act and not grouped.recompute_act
    rc_out, rc_grads = _run(rc, x, probs, counts)
    out["recompute_equal"] = torch.equal(rc_out, got_out) and all(
        torch.equal(rc_grads[k], got_grads[k]) for k in got_grads)
    # bf16 (the grouped kernel's other CPU dtype): close to the fp32 reference
    tf_bf = dataclasses.replace(tf, params_dtype=torch.bfloat16, bf16=True)
    bf = _experts("grouped", tf_bf, 4, {k: v.bfloat16() if torch.is_tensor(v) else v
                                      for k, v in weights.items()})
    bf_out, bf_grads = _run(bf, x.bfloat16(), probs, counts)
    out["bf16_out"] = _rel(bf_out.float(), ref_out)
    out["bf16_dx"] = _rel(bf_grads["x"].float(), ref_grads["x"])
    return out


def _model_parity():
    """Whole tiny model: loss and every gradient, sequential vs grouped, same weights."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.experts import expert_impl_of
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(seed=5)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16)[None].expand(2, -1)
    runs, state = {}, None
    for impl in ("sequential", "grouped"):
        cfg = tiny_config(expert_impl=impl, mtp_num_layers=1)
        model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True,
                                    post_process=True)
        assert {expert_impl_of(m) for n, m in model.named_modules()
                if n.endswith("mlp.experts")} == {impl}
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).mean()
        loss.backward()
        runs[impl] = (loss.detach(), per_expert_grads(model.named_parameters()))
    (l_s, g_s), (l_g, g_g) = runs["sequential"], runs["grouped"]
    assert g_s.keys() == g_g.keys()
    return {"loss": abs(float(l_s - l_g)) / abs(float(l_s)),
            "grads": max(_rel(g_g[k], g_s[k]) for k in g_s if g_s[k] is not None)}


def _parity():
    module = _module_parity()
    return module, _model_parity()


def test_grouped_experts_equal_sequential():
    out, model = run_distributed(_parity, 1)[0]
    print(out, model)
    assert out["fp32_out"] <= 1e-6 and out["fp32_grads"] <= 1e-6, out
    assert out["zero_expert_grads"] == 0.0
    assert out["recompute_equal"]
    assert out["bf16_out"] < 2e-2 and out["bf16_dx"] < 2e-2, out
    assert model["loss"] <= 1e-6 and model["grads"] <= 1e-6, model


def _init_at(expert: int, expert_tensor: int) -> dict:
    """Full-model state at init for a layout (experts gathered to their global indices)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.config import load_config
    from longcat_megatron.model.parallel_slicing import full_key
    from longcat_megatron.training.setup import build_model

    cfg = load_config(f"{ROOT}/configs/tiny_longcat.yaml", [
        "parallel.tensor=2", "parallel.sequence_parallel=true", f"parallel.expert={expert}",
        f"parallel.expert_tensor={expert_tensor}", "model.mtp_num_layers=0", "train.global_batch_size=8"])
    layout = runtime.initialize(tensor=2, expert=expert, expert_tensor=expert_tensor,
                                num_experts=cfg.model.num_experts, seed=11)
    model = build_model(cfg, layout, wrap_ddp=False)[0]
    out = {}
    for key, value in model.state_dict().items():
        if not torch.is_tensor(value) or key.endswith("_extra_state"):
            continue
        if ".local_experts." in key and ps.get_expert_tensor_parallel_world_size() > 1:
            parts = [torch.empty_like(value) for _ in range(ps.get_expert_tensor_parallel_world_size())]
            dist.all_gather(parts, value.contiguous(), group=ps.get_expert_tensor_parallel_group())
            if key.endswith("linear_fc1.weight"):   # per rank [gate_r; up_r]
                halves = [p.chunk(2) for p in parts]
                value = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
            else:
                value = torch.cat(parts, dim=1)
        out[full_key(model, key)] = value.clone()
    if ps.get_expert_model_parallel_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: v for k, v in out.items() if ".local_experts." in k})
        for part in gathered:
            out.update(part)
    return out


def _layouts() -> dict:
    return {"ep1": _init_at(1, 1), "ep2": _init_at(2, 1), "ep1_etp2": _init_at(1, 2)}


def test_expert_init_is_distinct_and_independent_of_the_layout():
    """Experts pairwise distinct; every tensor (experts included) the same at EP1, EP2, ETP2."""
    import torch

    runs = run_distributed(_layouts, 2)[0]
    ref = runs["ep1"]
    experts = sorted(k for k in ref if "layers.0.mlp.experts.local_experts." in k and "fc1" in k)
    assert len(experts) == 8
    for i, a in enumerate(experts):
        assert not any(torch.equal(ref[a], ref[b]) for b in experts[:i]), a
    for name, run in runs.items():
        assert run.keys() == ref.keys(), name
        differ = [k for k in ref if not torch.equal(run[k], ref[k])]
        assert not differ, (name, differ[:5])
