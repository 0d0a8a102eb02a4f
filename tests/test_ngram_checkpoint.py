"""Row-sharded tables in megatron dist_checkpointing: save under one sharding, load under another
(TP=2 -> TP=4 and -> the tensor x data partition; tensor x data on 4 ranks -> 1 process), same
outputs as the released forward with the saved weights."""

import torch

from tests.harness import run_distributed
from tests.test_ngram_embedding import (
    RATIO, T, V, build_embedding, inputs, reference_outputs_and_grads, rel_err,
)


def _save(ckpt_dir, tp, expert, partition):
    from megatron.core import dist_checkpointing

    from longcat_megatron import runtime

    runtime.initialize(tensor=tp, expert=expert)
    emb = build_embedding(tp=tp, partition=partition)            # the reference weights
    dist_checkpointing.save(emb.sharded_state_dict(), ckpt_dir)
    return emb.ngram_tables.shape[0]


def _load_and_run(ckpt_dir, layouts, save_dir=None):
    """Load ``ckpt_dir`` under each layout into a freshly initialised embedding; optionally save
    the last one to ``save_dir``."""
    from megatron.core import dist_checkpointing

    from longcat_megatron import runtime

    outs = []
    for tp, expert, partition in layouts:
        runtime.initialize(tensor=tp, expert=expert, seed=99)
        emb = build_embedding(tp=tp, partition=partition, load_reference=False)  # fresh random init
        x, _ = inputs(batch=2)
        before = emb(x, None).detach()
        emb.load_state_dict(dist_checkpointing.load(emb.sharded_state_dict(), ckpt_dir))
        outs.append((before, emb(x, None).detach(), emb.ngram_tables.shape[0]))
    if save_dir is not None:
        dist_checkpointing.save(emb.sharded_state_dict(), save_dir)
    return outs


def test_save_tp2_load_tp4_and_tensor_data(tmp_path):
    x, grad_out = inputs(batch=2)
    ref_out, _ = reference_outputs_and_grads(x, grad_out[:, :2])
    tp2, data4 = tmp_path / "tp2", tmp_path / "tensor_data4"
    tp2.mkdir()
    data4.mkdir()

    run_distributed(_save, 2, str(tp2), 2, 1, "tensor")
    layouts = [(4, 1, "tensor"), (1, 4, "tensor_data")]
    results = run_distributed(_load_and_run, 4, str(tp2), layouts, str(data4), timeout=400)
    for i, layout in enumerate(layouts):
        for rank in results:
            before, after, _ = rank[i]
            assert rel_err(before, ref_out) > 1e-2, layout   # the fresh init really differed
            assert rel_err(after, ref_out) < 1e-6, layout
    assert len({rank[1][2] for rank in results}) <= 2       # tensor_data: ~1/4 of the rows each

    # saved by 4 row shards of the tensor x data partition, loaded by one process holding all rows
    (_, after, rows), = run_distributed(_load_and_run, 1, str(data4), [(1, 1, "tensor")])[0]
    assert rel_err(after, ref_out) < 1e-6
    assert rows == sum(int(RATIO * V + 2 * i + 1) for i in range(T))


# ------------------------------------------------------- optimizer state: resume under another group
OPT_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _ddp_and_optimizer(tp, expert, partition):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from longcat_megatron import runtime

    runtime.initialize(tensor=tp, expert=expert)
    emb = build_embedding(tp=tp, sp=tp > 1, partition=partition)
    ddp = DistributedDataParallel(config=emb.config, module=emb, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.01, weight_decay=0.0,
                                                 use_distributed_optimizer=True, clip_grad=0.0), [ddp])
    return emb, ddp, opt


def _adam_step(emb, ddp, opt, seed, global_dp=2):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    x, grad_out = inputs(seed=seed)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    b = x.shape[0] // dp
    x, grad_out = x[rank * b:(rank + 1) * b], grad_out[:, rank * b:(rank + 1) * b]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        grad_out = grad_out.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    # the loss is the mean over a fixed number of batch shards, whatever the DP size
    (ddp(x, None) * grad_out).sum().mul(dp / global_dp).backward()
    finalize_model_grads([ddp])
    assert opt.step()[0]


def _step_and_save(ckpt_dir, tp, expert, partition):
    from megatron.core import dist_checkpointing

    emb, ddp, opt = _ddp_and_optimizer(tp, expert, partition)
    _adam_step(emb, ddp, opt, seed=3)
    model = emb.sharded_state_dict(metadata=dict(OPT_META))
    dist_checkpointing.save(
        {"model": model, "optimizer": opt.sharded_state_dict(model, metadata=dict(OPT_META))}, ckpt_dir)


def _load_and_step(ckpt_dir, tp, expert, partition):
    from megatron.core import dist_checkpointing

    emb, ddp, opt = _ddp_and_optimizer(tp, expert, partition)
    if ckpt_dir is None:                      # reference: both steps in this process
        _adam_step(emb, ddp, opt, seed=3)
    else:
        ddp.zero_grad_buffer()                # torch Adam (no Apex/TE) has no state before a step
        opt.step()                            # zero gradients: creates the state, moves nothing
        model = emb.sharded_state_dict(metadata=dict(OPT_META))
        loaded = dist_checkpointing.load({"model": model, "optimizer": opt.sharded_state_dict(
            model, is_loading=True, metadata=dict(OPT_META))}, ckpt_dir)
        emb.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
    _adam_step(emb, ddp, opt, seed=5)
    return emb.row_start, emb.ngram_tables.detach().clone()


def test_adam_state_resumes_under_another_group_size(tmp_path):
    # step 1 with the tables over 4 ranks (TP=2 x EP=2), step 2 after loading with them over 2 ranks
    run_distributed(_step_and_save, 4, str(tmp_path), 2, 2, "tensor_data", timeout=400)
    resumed = run_distributed(_load_and_step, 2, str(tmp_path), 1, 2, "tensor_data", timeout=400)
    (_, reference), = run_distributed(_load_and_step, 1, None, 1, 1, "tensor_data", timeout=400)
    table = torch.cat([t for _, t in sorted(dict(resumed).items())])
    assert table.shape == reference.shape
    assert float((table - reference).abs().max()) < 1e-6
