"""Activation recompute (``train.recompute``) changes memory, not results: the gradients of every
parameter with selective recompute (core attention + MLA up projections), full recompute (each
shortcut layer through megatron's ``tensor_parallel.checkpoint``) and full recompute of the first
layer only equal those without recompute (bitwise or within 1e-7 of the gradient scale), with
attention dropout on (the RNG tracker replays the same masks), in one process and at TP2 (+SP), EP2
and CP2, also with packed documents (a ``DocumentMask``, bound outside the checkpointed tensors); the recompute really runs (the up projections / layers run twice) and the router's step
statistics are counted once.
"""

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import tiny_config

SEQ, BATCH = 16, 2
DROPOUT = dict(mtp_num_layers=1, attention_dropout=0.2)
MODES = [("selective", None), ("full", None), ("full", 1)]


def _set_recompute(tf, cfg, mode, num_layers):
    """Switch the tf config of a built model between recompute settings."""
    from longcat_megatron.model.factory import recompute_fields

    tf.recompute_granularity, tf.recompute_method, tf.recompute_num_layers = None, None, None
    tf.recompute_modules = ["core_attn"]
    for name, value in recompute_fields(cfg, mode, num_layers, cfg.num_layers).items():
        setattr(tf, name, value)


def _recompute_vs_none(layout, cases):
    import torch
    from megatron.core import tensor_parallel

    from longcat_megatron import runtime
    from longcat_megatron.model.attention import LongcatMLA
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    calls = {"up_project": 0}
    up_project = LongcatMLA._up_project

    def counted(self, *args):
        calls["up_project"] += 1
        return up_project(self, *args)

    LongcatMLA._up_project = counted
    runtime.initialize(**layout, seed=17)
    tensor = layout.get("tensor", 1)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (BATCH, SEQ + 1), generator=g)
    batch = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "position_ids": torch.arange(SEQ)[None].expand(BATCH, -1).contiguous()}
    if layout.get("context", 1) > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    out = {}
    for name, overrides in cases:
        mask = DocumentMask.from_starts([[0, 5, 11], [0, 9]], SEQ) if "documents" in name else None
        cfg = tiny_config(**overrides)
        tf = transformer_config(cfg, sequence_parallel=tensor > 1, **layout)
        model = build_longcat_chunk(cfg, tf, pre_process=True, post_process=True).train()
        rng = (torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states())

        def run(mode, num_layers, tracker_state=rng[1]):
            _set_recompute(tf, cfg, mode, num_layers)
            torch.set_rng_state(rng[0])
            # (set_states keeps the dict it is given and forks update it: pass a copy)
            tensor_parallel.get_cuda_rng_tracker().set_states(dict(tracker_state))
            model.zero_grad()
            calls["up_project"] = 0
            model(batch["tokens"], batch["position_ids"], mask,
                  labels=batch["labels"]).float().sum().backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            picks = torch.stack([r.step_picks.clone() for _, r in model.routers()])
            for _, router in model.routers():
                router.end_step()
            return grads, picks, calls["up_project"]

        ref, ref_picks, ref_calls = run("none", None)
        if cfg.attention_dropout > 0:   # dropout is live: another RNG state, other gradients
            tracker = tensor_parallel.get_cuda_rng_tracker()
            tracker.set_states(dict(rng[1]))
            with tracker.fork():
                torch.rand(1)
            other = run("none", None, tracker.get_states())[0]
            out["dropout_live", name] = any(not torch.equal(other[k], g) for k, g in ref.items())
        scale = max(float(g.abs().max()) for g in ref.values())
        for mode, num_layers in MODES:
            grads, picks, n_calls = run(mode, num_layers)
            assert set(grads) == set(ref)
            worst = max(float((grads[k] - g).abs().max()) for k, g in ref.items()) / scale
            bitwise = all(torch.equal(grads[k], g) for k, g in ref.items())
            out[(name, mode, num_layers)] = dict(
                worst=worst, bitwise=bitwise, same_picks=bool(torch.equal(picks, ref_picks)),
                calls=(ref_calls, n_calls), picked=float(ref_picks.sum()))
    return out


def _check(results, attentions):
    """``attentions``: MLA blocks per forward (2 per shortcut layer + the MTP's)."""
    for rank_result in results:
        for key, r in rank_result.items():
            if key[0] == "dropout_live":
                assert r, key
                continue
            name, mode, layers = key
            print(name, mode, layers, r)
            assert r["bitwise"] or r["worst"] <= 1e-7, (name, mode, layers, r)
            assert r["same_picks"] and r["picked"] > 0
            none_calls, calls = r["calls"]
            assert none_calls == attentions
            # selective: every up projection runs again; full: the recomputed layers' two each
            extra = attentions if mode == "selective" else 2 * (layers or 2)
            assert calls == none_calls + extra, (mode, layers, r["calls"])


SINGLE_CASES = [("sdpa", dict(mtp_num_layers=1)), ("sdpa_dropout", DROPOUT),
                ("eager_dropout", {**DROPOUT, "attention_backend": "eager"}),
                ("sdpa_dropout_documents", DROPOUT)]
LAYOUTS = {"single": dict(), "tp2_sp": dict(tensor=2), "ep2": dict(expert=2),
           "cp2": dict(context=2)}


def _all_layouts():
    """One pair of processes for every layout (start-up dominates); "single": each rank runs the
    whole model alone (data-parallel ranks, no communication in the model)."""
    others = {"cp2": [("sdpa_dropout", DROPOUT), ("sdpa_dropout_documents", DROPOUT)]}
    return {name: _recompute_vs_none(layout, SINGLE_CASES if name == "single"
                                     else others.get(name, [("sdpa_dropout", DROPOUT)]))
            for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_layouts, 2, timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_gradients_equal(results, layout):
    _check([r[layout] for r in results], attentions=5)
