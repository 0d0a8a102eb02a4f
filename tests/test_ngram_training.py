"""One optimizer step through megatron-core's DDP + distributed optimizer with the row-sharded
tables == the same step in one process. The 'tensor_data' shards are not DP replicas: megatron must
neither average them with other ranks' rows nor shard their optimizer state across owners."""

import torch

from tests.harness import run_distributed
from tests.test_ngram_embedding import BATCH, build_embedding, inputs, reference_weights

LR = 0.01


def _train_step(tp, expert, partition, dp_of_sharded_run):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from longcat_megatron import runtime

    runtime.initialize(tensor=tp, expert=expert)
    sp = tp > 1
    emb = build_embedding(tp=tp, sp=sp, partition=partition)
    ddp = DistributedDataParallel(
        config=emb.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                 grad_reduce_in_fp32=True),
        module=emb,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, use_distributed_optimizer=True,
                        clip_grad=0.0),
        [ddp],
    )
    in_expert_buffers = any(
        p is emb.ngram_tables for buf in ddp.expert_parallel_buffers for p in buf.params
    )

    x, grad_out = inputs()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    b = BATCH // dp
    x, grad_out = x[dp_rank * b:(dp_rank + 1) * b], grad_out[:, dp_rank * b:(dp_rank + 1) * b]
    if sp:
        grad_out = grad_out.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = ddp(x, None)
    # one process holding the whole batch sees the DP-average of the per-rank losses
    scale = 1.0 / dp_of_sharded_run if dp == 1 else 1.0
    (out * grad_out).sum().mul(scale).backward()
    fused = emb.ngram_tables.grad_added_to_main_grad   # rows went straight into DDP's buffer
    finalize_model_grads([ddp])
    ok, _, _ = opt.step()
    assert ok
    return {
        "table": (emb.row_start, emb.ngram_tables.detach().clone()),
        "word": (emb.word_embeddings.vocab_start_index, emb.word_embeddings.weight.detach().clone()),
        "projs": torch.stack([p.weight.detach() for p in emb.post_projs]),
        "table_is_expert_group": in_expert_buffers,
        "fused": fused,
    }


def _train_steps(runs):
    return [_train_step(*run) for run in runs]


def _assemble(ranks, key):
    pieces = sorted({r[key][0]: r[key][1] for r in ranks}.items())
    return torch.cat([t for _, t in pieces])


LAYOUTS = [(2, 2, "tensor_data"), (1, 4, "tensor_data"), (1, 2, "tensor_data"), (2, 1, "tensor")]


def test_one_adam_step_matches_single_process():
    runs = [(tp, expert, partition, 4 // tp) for tp, expert, partition in LAYOUTS]
    sharded = run_distributed(_train_steps, 4, runs, timeout=400)
    dps = sorted({4 // tp for tp, _, _ in LAYOUTS})
    singles = dict(zip(dps, run_distributed(_train_steps, 1, [(1, 1, "tensor", dp) for dp in dps])[0]))
    initial = torch.cat(reference_weights()[1])
    for i, (tp, expert, partition) in enumerate(LAYOUTS):
        ranks = [rank[i] for rank in sharded]
        single = singles[4 // tp]
        name = (tp, expert, partition)
        assert all(r["table_is_expert_group"] == (partition == "tensor_data") for r in ranks), name
        assert all(r["fused"] for r in ranks + [single]), name
        table = _assemble(ranks, "table")
        assert table.shape == initial.shape, name
        moved = (table - initial).abs().sum(dim=1) > 0
        assert moved.any() and not moved.all(), name  # Adam moved exactly the rows that were hit
        assert torch.allclose(table, single["table"][1], atol=2e-6, rtol=0), name
        assert torch.allclose(_assemble(ranks, "word"), single["word"][1], atol=2e-6, rtol=0), name
        for r in ranks:
            assert torch.allclose(r["projs"], single["projs"], atol=2e-6, rtol=0), name
