"""Parallel LongCat == single process: forward logits, loss and gradients (incl. the aux losses).

One reference run (1 process) gives the full weights, logits, loss and gradients; each layout loads
the same weights, runs megatron's forward-backward schedule on its share of the batch, reduces the
gradients the way megatron's DDP does, and compares its slices with the reference.
"""

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import pack, tiny_config, unpack

SEQ, BATCH = 16, 4
# MTP, hidden z-loss and (where the data is not split over DP) the device-level LB loss are on.
AUX = dict(mtp_num_layers=1, z_loss_coeff=1e-3, budget_target_ffn_experts=2.0)
LB = dict(device_lb_loss_coeff=1e-2, device_lb_groups=2)


def _batch():
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _build(cfg, tensor=1, pipeline=1, expert=1, expert_tensor=None, per_token=False):
    from megatron.core import parallel_state as ps

    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    tf = transformer_config(cfg, tensor=tensor, pipeline=pipeline, expert=expert,
                            expert_tensor=expert_tensor, sequence_parallel=tensor > 1)
    tf.calculate_per_token_loss = per_token   # the training loop's setting: loss = token sum
    model = build_longcat_chunk(cfg, tf, pre_process=ps.is_pipeline_first_stage(),
                                post_process=ps.is_pipeline_last_stage())
    return model, tf


def _run_schedule(model, tf, ids, labels, forward_only):
    """One micro-batch through megatron's schedule; returns its loss (mean per token) or logits."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)

    def step(data_iterator, m):
        out = m(ids, pos, None, labels=None if forward_only else labels)

        def loss_func(output):
            if forward_only:
                return output.sum() * 0, {"logits": output.detach()}
            if tf.calculate_per_token_loss:
                total, count = output.float().sum(), output.numel()
                return total, torch.tensor(count), {"loss": total.detach() / count}
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=forward_only)
    if not store:
        return None
    return store[0]["logits" if forward_only else "loss"]


def _reference(overrides, per_token):
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing

    runtime.initialize(seed=11)
    cfg = tiny_config(**overrides)
    model, tf = _build(cfg, per_token=per_token)
    ids, labels = _batch()
    full = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.eval()
    logits = _run_schedule(model, tf, ids, labels, forward_only=True)
    model.train()
    loss = _run_schedule(model, tf, ids, labels, forward_only=False)
    grads = {k: g.clone() for k, g in parallel_slicing.split_stacked_experts(
        (n, p.grad) for n, p in model.named_parameters()) if g is not None}
    return pack((full, logits, loss, grads))


def _reduce_like_ddp(model):
    """SP-tagged grads: sum over TP; dense grads: mean over DP; expert grads: sum over the
    expert-data-parallel group, then / DP (what megatron's DDP scaling amounts to)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if getattr(p, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        if not getattr(p, "allreduce", True):   # expert parameters (megatron's mark)
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
        else:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        p.grad /= dp


def _parallel(layout, overrides, reference, per_token=False):
    import torch
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing

    full, ref_logits, ref_loss, ref_grads = unpack(reference)
    runtime.initialize(**layout)
    cfg = tiny_config(**overrides)
    model, tf = _build(cfg, **layout, per_token=per_token)
    parallel_slicing.load_full_state_dict(model, full)
    ids, labels = _batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    model.eval()
    logits = _run_schedule(model, tf, ids[rows], labels[rows], forward_only=True)
    model.train()
    loss = _run_schedule(model, tf, ids[rows], labels[rows], forward_only=False)
    _reduce_like_ddp(model)
    out = {"stage_last": ps.is_pipeline_last_stage()}
    if logits is not None:
        want = ref_logits[rows]
        out["logits"] = float((logits - want).abs().max() / want.abs().max())
    if loss is not None:
        out["loss"] = (float(loss), dp_rank)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    worst, checked = 0.0, 0
    for name, got in parallel_slicing.split_stacked_experts(
            (n, p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()):
        fk = parallel_slicing.full_key(model, name)
        want = parallel_slicing.shard(model, name, ref_grads[fk])
        worst = max(worst, float((got - want).abs().max()) / scale)
        checked += 1
    out["grads"], out["checked"] = worst, checked
    out["routed"] = float(sum(r.step_tokens for _, r in model.routers()))
    from longcat_megatron.model.moe import ZeroExpertMoE

    out["overlap"] = [m.overlap for m in model.modules() if isinstance(m, ZeroExpertMoE)]
    if ps.get_expert_model_parallel_world_size() > 1:
        # Steer every token away from the experts of the last EP rank: it receives zero tokens,
        # forward and backward must still work.
        for _, router in model.routers():
            router.expert_bias[cfg.num_experts // 2: cfg.num_experts] = -1e4
            router.end_step()
        model.zero_grad()
        _run_schedule(model, tf, ids[rows], labels[rows], forward_only=False)
        picks = sum(r.step_picks for _, r in model.routers())
        out["dead_expert_picks"] = float(picks[cfg.num_experts // 2: cfg.num_experts].sum())
    return out


def _references():
    from longcat_megatron import runtime

    # token-sum loss units (the training loop's calculate_per_token_loss) with the LB loss
    lb = _reference({**AUX, **LB}, True)
    runtime.shutdown()
    # per-micro-batch mean loss units, data split over DP (no LB loss: it is not additive)
    return {"lb": lb, "nolb": _reference(AUX, False)}


@pytest.fixture(scope="module")
def refs():
    return run_distributed(_references, 1)[0]


# The alltoall dispatcher runs the ScMoE overlap (async dispatch/combine around the dense branch).
A2A = dict(moe_token_dispatcher_type="alltoall")
LAYOUTS = [
    ("tp2_sp", dict(tensor=2), 2, "lb", {}),
    ("pp2", dict(pipeline=2), 2, "lb", {}),
    ("ep2_overlap", dict(expert=2), 2, "nolb", A2A),
    ("tp2_ep2", dict(tensor=2, expert=2), 4, "nolb", {}),
    ("tp2_etp1_ep2_overlap", dict(tensor=2, expert=2, expert_tensor=1), 4, "nolb", A2A),
]


@pytest.mark.parametrize("name,layout,world,ref_key,extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_parallel_equals_single_process(refs, name, layout, world, ref_key, extra):
    overrides = {**(AUX if ref_key == "nolb" else {**AUX, **LB}), **extra}
    ref = refs[ref_key]
    results = run_distributed(_parallel, world, layout, overrides, ref, ref_key == "lb",
                              timeout=400)
    ref_loss = float(unpack(ref)[2])
    losses = [r["loss"] for r in results if "loss" in r]
    # DP ranks each see half the batch: their mean is the full-batch loss.
    by_dp = {dp_rank: v for v, dp_rank in losses}
    mean_loss = sum(by_dp.values()) / len(by_dp)
    print(name, {k: v for k, v in results[-1].items()}, "ref loss", ref_loss)
    assert abs(mean_loss - ref_loss) / abs(ref_loss) < 1e-5
    assert all(r["grads"] < 1e-5 for r in results), [r["grads"] for r in results]
    assert all(r["logits"] < 1e-5 for r in results if "logits" in r)
    assert all(r["checked"] > 0 for r in results)
    if layout.get("expert", 1) > 1:   # an expert-parallel rank that receives no token works
        assert all(r["dead_expert_picks"] == 0 for r in results)
    want_overlap = extra.get("moe_token_dispatcher_type") == "alltoall"
    assert all(r["overlap"] and all(v == want_overlap for v in r["overlap"]) for r in results)
