"""Context parallelism (CP=2) of the LongCat model == one process on the whole sequence.

The CP run splits every micro-batch with megatron's ``get_batch_on_this_cp_rank`` (load-balanced:
rank r holds chunks r and 2·CP−1−r of 2·CP), loads the reference weights, runs megatron's schedule
and sums the gradients over CP (what megatron DDP does with ``calculate_per_token_loss``, the training
loop's setting). Compared with the single-process run: logits (gathered back into global order),
the token-sum loss (with MTP, hidden z-loss) and the gradient of every parameter, 1e-5 relative.
Cases: plain embedding + MTP + z-loss (token-sum and megatron's mean loss units); the N-gram
Embedding (its ids gathered over CP); YaRN with per-document position ids and a dense document
mask, or the same documents as a ``DocumentMask`` (document starts, kept whole over CP); the first two also at CP2 x TP2 + SP (4 processes). Then the training loop at
parallel.context=2 against parallel.context=1 (same global batch), and the LB-loss refusal.
"""

import os

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import YARN, pack, tiny_config, unpack
from tests.train_utils import ROOT, run_training

SEQ, BATCH, EOS = 16, 2, 2
AUX = dict(mtp_num_layers=1, z_loss_coeff=1e-3, budget_target_ffn_experts=2.0)
CASES = ["mtp", "mtp_mean_loss", "ngram", "yarn_docmask", "yarn_documents"]


def _overrides(case):
    if case == "ngram":
        from longcat_megatron.model.ngram_config import NgramConfig

        ngram = NgramConfig(ngram_vocab_size_ratio=3.3, emb_neighbor_num=3, emb_split_num=2,
                            eos_token_id=EOS)
        return {**AUX, "ngram": ngram}
    if case in ("yarn_docmask", "yarn_documents"):
        return {**AUX, **YARN}
    return dict(AUX)


def _batch(case):
    """Whole-sequence micro-batch: tokens (EOS inside), labels, position ids, optional mask."""
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (BATCH, SEQ + 1), generator=g)
    ids[torch.rand(BATCH, SEQ + 1, generator=g) < 0.15] = EOS
    ids[0, SEQ // 2 - 1] = EOS                                  # a document ends at a CP chunk edge
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(SEQ)[None].expand(BATCH, -1).clone()
    batch = {"tokens": tokens, "labels": labels, "position_ids": pos}
    if case in ("yarn_docmask", "yarn_documents"):
        # Documents end with EOS: positions restart and attention stays inside each document.
        doc = torch.zeros(BATCH, SEQ, dtype=torch.long)
        doc[:, 1:] = (tokens[:, :-1] == EOS).long().cumsum(1)
        for b in range(BATCH):
            for d in doc[b].unique():
                where = (doc[b] == d).nonzero().flatten()
                pos[b, where] = torch.arange(where.numel())
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
        batch["attention_mask"] = (~allowed)[:, None]                # [b, 1, s, s], True = masked
        if case == "yarn_documents":
            from longcat_megatron.model.document_mask import DocumentMask

            batch["attention_mask"] = DocumentMask.from_eod(tokens, EOS)
            assert torch.equal(batch["attention_mask"].dense(), (~allowed)[:, None])
    return batch


def _per_token(case) -> bool:
    """The training loop's loss units (token sum), or megatron's per-micro-batch mean units."""
    return case != "mtp_mean_loss"


def _build(cfg, context, tensor, per_token):
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    tf = transformer_config(cfg, context=context, tensor=tensor, sequence_parallel=tensor > 1)
    tf.calculate_per_token_loss = per_token
    return build_longcat_chunk(cfg, tf, pre_process=True, post_process=True), tf


def _schedule(model, tf, batch, forward_only):
    """One micro-batch through megatron's schedule: logits [b, s, V] or this rank's loss: token
    sum, or in mean units its share of the sequence's mean (local sum / all tokens; megatron
    multiplies it by CP and DDP averages the grads over CP)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        out = m(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                labels=None if forward_only else batch["labels"])

        def loss_func(output):
            if forward_only:
                return output.sum() * 0, {"logits": output.detach()}
            if tf.calculate_per_token_loss:
                total = output.float().sum()
                return total, torch.tensor(output.numel()), {"loss": total.detach()}
            share = output.float().sum() / (output.numel() * ps.get_context_parallel_world_size())
            return share, {"loss": share.detach().clone()}

        return out, loss_func

    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=batch["tokens"].shape[1], micro_batch_size=BATCH, forward_only=forward_only)
    return store[0]["logits" if forward_only else "loss"]


def _model(case, context, tensor=1):
    """The case's tiny LongCat (built under the current parallel state) and its tf config."""
    return _build(tiny_config(**_overrides(case)), context, tensor, _per_token(case))


def _reference():
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing

    runtime.initialize(seed=11)
    out = {}
    for case in CASES:
        model, tf = _model(case, 1)
        batch = _batch(case)
        full = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        model.eval()
        logits = _schedule(model, tf, batch, forward_only=True)
        model.train()
        loss = _schedule(model, tf, batch, forward_only=False)
        grads = {k: g.clone() for k, g in parallel_slicing.split_stacked_experts(
        (n, p.grad) for n, p in model.named_parameters()) if g is not None}
        out[case] = (full, logits, float(loss), grads, dict(model._last_aux))
    return pack(out)


def _context_parallel(reference, tensor, cases):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing
    from longcat_megatron.model.attention import gather_sequence_over_cp
    from longcat_megatron.training.loop import batch_on_this_cp_rank

    refs = unpack(reference)
    runtime.initialize(context=2, tensor=tensor)
    cp_group = ps.get_context_parallel_group()
    out = {}
    for case in cases:
        full, ref_logits, ref_loss, ref_grads, ref_aux = refs[case]
        model, tf = _model(case, 2, tensor)
        parallel_slicing.load_full_state_dict(model, full)
        batch = batch_on_this_cp_rank(_batch(case))
        model.eval()
        logits = _schedule(model, tf, batch, forward_only=True)            # [b, s/2, V]
        logits = gather_sequence_over_cp(logits.transpose(0, 1)).transpose(0, 1)
        model.train()
        loss = _schedule(model, tf, batch, forward_only=False)
        # Losses add up over CP. Grads: token-sum units add up (megatron DDP sums them before its
        # division by the global token count); mean units: DDP averages them over CP.
        average = 1 if _per_token(case) else ps.get_context_parallel_world_size()
        total = torch.tensor([float(loss)], dtype=torch.float64)
        dist.all_reduce(total, group=cp_group)
        worst, checked = 0.0, 0
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for name, p in model.named_parameters():
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            if getattr(p, "sequence_parallel", False) and tensor > 1:   # SP-tagged: sum over TP
                dist.all_reduce(got, group=ps.get_tensor_model_parallel_group())
            dist.all_reduce(got, group=cp_group)
            got /= average
            for key, piece in parallel_slicing.split_stacked_experts([(name, got)]):
                want = parallel_slicing.shard(model, key, ref_grads[parallel_slicing.full_key(model, key)])
                worst = max(worst, float((piece - want).abs().max()) / scale)
                checked += 1
        out[case] = {
            "logits": float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
            "loss": abs(float(total) - ref_loss) / abs(ref_loss),
            "grads": worst, "checked": checked,
            "grad_names": len(ref_grads),
            "mtp_loss": abs(float(model._last_aux["mtp_loss"]) - float(ref_aux["mtp_loss"]))
            / float(ref_aux["mtp_loss"]),
        }
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference, 1)[0]


@pytest.fixture(scope="module")
def cp2_results(reference):
    return run_distributed(_context_parallel, 2, reference, 1, CASES, timeout=400)


def _assert_equal_to_reference(results, case):
    for rank, result in enumerate(results):
        r = result[case]
        print(case, rank, r)
        assert r["checked"] == r["grad_names"] > 0
        assert r["logits"] < 1e-5, r
        assert r["loss"] < 1e-5, r
        assert r["grads"] < 1e-5, r
        assert r["mtp_loss"] < 1e-5, r


@pytest.mark.parametrize("case", CASES)
def test_cp2_equals_single_process(cp2_results, case):
    _assert_equal_to_reference(cp2_results, case)


def test_cp2_with_tp2_sequence_parallel_equals_single_process(reference):
    cases = ["mtp", "ngram"]
    results = run_distributed(_context_parallel, 4, reference, 2, cases, timeout=400)
    for case in cases:
        _assert_equal_to_reference(results, case)


def test_lb_loss_with_cp_is_a_clear_config_error():
    from longcat_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="device_lb_loss_coeff"):
        load_config(os.path.join(ROOT, "configs", "tiny_longcat.yaml"),
                    ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.context=2",
                     "model.device_lb_loss_coeff=0.01", "model.device_lb_groups=2"])


def test_lb_loss_with_cp_is_refused_by_the_model_builder():
    from longcat_megatron.model.config import ModelConfigError
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    cfg = tiny_config(budget_target_ffn_experts=2.0, device_lb_loss_coeff=1e-2, device_lb_groups=2)
    with pytest.raises(ModelConfigError, match=r"parallel\.context=2 with model\.device_lb_loss_coeff"):
        build_longcat_chunk(cfg, transformer_config(cfg, context=2), pre_process=True,
                            post_process=True)


TRAIN = [
    "parallel.tensor=1", "parallel.sequence_parallel=false", "data.seq_length=32",
    "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=3",
    "logging.log_interval=1",
]


def test_training_loop_cp2_matches_cp1(tmp_path):
    """Packed short documents with document masking (a DocumentMask through the loop's CP split)."""
    import numpy as np

    from tests.test_data_pretrain import write_indexed

    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "docs")
    write_indexed(prefix, [list(rng.integers(3, 250, size=rng.integers(2, 20))) + [EOS]
                           for _ in range(200)])
    train = TRAIN + [f"data.paths=['{prefix}']", "data.mock=false", "data.split='100,0,0'",
                     "data.reset_attention_mask=true", "data.reset_position_ids=true",
                     f"data.cache_dir={tmp_path / 'cache'}"]
    config = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")
    cp1 = run_distributed(run_training, 1, train, config)[0]
    cp2 = run_distributed(run_training, 2, train + ["parallel.context=2"], config, timeout=400)
    want = cp1["losses"]                                   # {iteration: loss}
    assert sorted(want) == [1, 2, 3]
    for rank in cp2:
        assert sorted(rank["losses"]) == sorted(want)
        for it, loss in rank["losses"].items():
            assert abs(loss - want[it]) <= 1e-5 * abs(want[it]), (it, rank["losses"], want)
