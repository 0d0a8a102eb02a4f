"""Per-layer embeddings in LongCat's dense MLPs (model.per_layer_embedding: ple | plne):

* formula: each MLP == W_d(SiLU(W_g x) ⊙ e) written out by hand, e = the token table row (PLE) or
  the released N-gram Embedding forward at width F (PLNE); the tables reach the logits; the two MLPs
  of a layer start from different tables; full recompute gives the same gradients; summary
  (meta-device model) == param_count (analytic);
* layouts == one process (token-sum loss and the gradient of every parameter, 1e-5 relative to the
  largest gradient): TP2 + SP (ple; plne with the hashed tables over TP, and over the expert-TP x EP
  group = the TP ranks by all-to-all), EP2 with the hashed tables over the expert group
  (partition tensor_data, data split over DP), CP2 (the hash's halo across the CP chunks), PP2
  (ids on every stage);
* training: TP2 run saves at step 3; resumed at TP1 (tables resharded 2 row shards -> 1) its steps
  4-6 equal the uninterrupted TP2 run (1e-5 relative: TP changes the reduction order, so not
  bitwise); ``ckpt_convert.to_hf`` refuses the checkpoint;
* config errors name the field and the fix.
"""

import dataclasses
import os
import shutil
import warnings

import pytest

from longcat_megatron.errors import UserInputError
from longcat_megatron.model.config import NgramRuleWarning
from tests.harness import run_distributed
from tests.longcat_tiny import pack, tiny_config, unpack
from tests.test_longcat_ngram import BATCH, SEQ, ngram_config, released_ngram_embedding, tokens
from tests.train_utils import ROOT, run_training

AUX = dict(mtp_num_layers=1, z_loss_coeff=1e-3, budget_target_ffn_experts=2.0)
TINY_PLNE = os.path.join(ROOT, "configs", "tiny_longcat_plne.yaml")


def variant(kind, partition="tensor", **overrides):
    """The tiny LongCat (F = 48) with per-layer embeddings: "ple" or "plne" (4 hashed sub-tables of
    width 12, 317..323 rows)."""
    layer_ngram = ngram_config(partition=partition) if kind == "plne" else None
    return tiny_config(**{**AUX, **overrides}, per_layer_embedding=kind, per_layer_ngram=layer_ngram)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------- formula, accounting
def _formula_and_counts():
    import torch
    import torch.nn.functional as F

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk
    from longcat_megatron.model.per_layer_embedding import PerLayerEmbeddingMLP, per_layer_inputs
    from longcat_megatron.model.summary import summarize, total_parameters

    runtime.initialize(seed=3)
    out = {}
    g = torch.Generator().manual_seed(1)
    ids = tokens(seed=4)[:, :-1]
    x = torch.randn(SEQ, BATCH, 32, generator=g)
    for kind in ("ple", "plne"):
        cfg = variant(kind)
        mlp = PerLayerEmbeddingMLP(cfg, transformer_config(cfg), stream=1)
        emb = mlp.per_layer_embedding
        word = torch.nn.Embedding.from_pretrained(emb.word_embeddings.weight.detach())
        if kind == "ple":
            e = word(ids)
        else:
            embedders = [torch.nn.Embedding.from_pretrained(emb.ngram_tables.detach()[a:b])
                         for a, b in emb.table_row_ranges()]
            e = released_ngram_embedding(ids, word, embedders, list(emb.post_projs), cfg.vocab_size)
        w_g, w_d = mlp.linear_fc1.weight.detach(), mlp.linear_fc2.weight.detach()
        with torch.no_grad():
            want = (F.silu(x @ w_g.T) * e.transpose(0, 1)) @ w_d.T
            got = mlp(x, per_layer_inputs(mlp, ids))[0]
            gate_only = F.silu(x @ w_g.T) @ w_d.T
        out[kind] = {"err": rel(got, want), "vs_gate_only": rel(gate_only, want),
                     "fc1": tuple(w_g.shape)}

        # in the model: the tables reach the logits; the two MLPs of a layer differ at init
        model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True,
                                    post_process=True).eval()
        pos = torch.arange(SEQ)[None].expand(BATCH, -1)
        layer = model.decoder.layers["1"]
        table = layer.mlps_1.per_layer_embedding.word_embeddings.weight
        with torch.no_grad():
            before = model(ids, pos, None)
            table.mul_(2.0)
            after = model(ids, pos, None)
        first = layer.mlps_0.per_layer_embedding
        second = layer.mlps_1.per_layer_embedding
        out[kind]["table_effect"] = rel(after, before)
        out[kind]["mlps_differ"] = (
            not torch.equal(first.word_embeddings.weight, second.word_embeddings.weight / 2)
            and (kind == "ple" or not torch.equal(first.ngram_tables, second.ngram_tables)))
        # full activation recompute re-runs the per-layer lookups: same gradients
        grads = {}
        for mode in ("none", "full"):
            m = build_longcat_chunk(cfg, transformer_config(cfg, recompute=mode), pre_process=True,
                                    post_process=True).train()
            m.load_state_dict(model.state_dict())
            m(ids, pos, None, labels=tokens(seed=4)[:, 1:]).sum().backward()
            grads[mode] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        table_grads = [n for n in grads["none"] if ".per_layer_embedding." in n]
        out[kind]["recompute"] = (max(rel(grads["full"][n], grads["none"][n]) for n in table_grads),
                                  set(grads["full"]) == set(grads["none"]), len(table_grads))

    # built (meta device) == analytic, parts reported apart, not activated per token
    inherit = tiny_config(per_layer_embedding="plne", ngram=ngram_config(amplification="sqrt"))
    layernorm = variant("plne", mtp_num_layers=0)
    layernorm.per_layer_ngram = ngram_config(amplification="layernorm")
    counts = {}
    for name, cfg in (("none", tiny_config()), ("ple", variant("ple")), ("plne", variant("plne")),
                      ("inherit", inherit), ("layernorm", layernorm)):
        s = summarize(cfg)
        counts[name] = (s, total_parameters(cfg))
    return out, counts


def test_formula_parts_and_parameter_counts():
    out, counts = run_distributed(_formula_and_counts, 1)[0]
    print(out)
    for kind, r in out.items():
        assert r["err"] < 1e-6, (kind, r)
        assert r["vs_gate_only"] > 1e-2, (kind, r)      # the embedding is really in the product
        assert r["fc1"] == (48, 32), (kind, r)           # gate only: no up half
        assert r["table_effect"] > 1e-3, (kind, r)      # a layer's table moves the logits
        assert r["mlps_differ"], kind
        err, same_names, n_tables = r["recompute"]
        assert err < 1e-6 and same_names and n_tables >= 4, (kind, r["recompute"])
    for name, (s, analytic) in counts.items():
        assert s["total"] == analytic, name
    none, ple, plne = (counts[k][0] for k in ("none", "ple", "plne"))
    L, V, H, F = 2, 96, 32, 48
    assert ple["parts"]["per-layer token tables"] == 2 * L * V * F
    assert ple["parts"]["dense MLPs"] == 2 * L * 2 * H * F == none["parts"]["dense MLPs"] * 2 // 3
    assert plne["parts"]["per-layer n-gram tables"] == 2 * L * (317 + 319 + 321 + 323) * (F // 4)
    assert plne["parts"]["per-layer projections"] == 2 * L * 4 * (F // 4) * F
    assert counts["layernorm"][0]["parts"]["per-layer projections"] == 2 * L * (F * F + 2 * F)
    inherited = counts["inherit"][0]["parts"]["per-layer n-gram tables"]
    assert inherited == plne["parts"]["per-layer n-gram tables"]
    # lookups are not activated parameters: only the dense MLPs' up projections go
    assert none["activated_min"] - ple["activated_min"] == 2 * L * H * F
    assert ple["activated_min"] == plne["activated_min"]


# ------------------------------------------------------------------------ layouts == 1 process
VARIANTS = {"ple": ("ple", "tensor"), "plne": ("plne", "tensor"), "plne_td": ("plne", "tensor_data")}
LAYOUTS = [("tp2_sp", "ple", dict(tensor=2)), ("tp2_sp", "plne", dict(tensor=2)),
           ("tp2_sp", "plne_td", dict(tensor=2)), ("ep2", "plne_td", dict(expert=2)),
           ("cp2", "plne", dict(context=2)),
           ("pp2", "plne", dict(pipeline=2))]


def _batch():
    import torch

    ids = tokens(seed=6)
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ)[None].expand(BATCH, -1).clone()}


def _build(name, layout):
    from megatron.core import parallel_state as ps

    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    cfg = variant(*VARIANTS[name])
    tensor = layout.get("tensor", 1)
    tf = transformer_config(cfg, sequence_parallel=tensor > 1, **layout)
    tf.calculate_per_token_loss = True            # the training loop's token-sum loss units
    return build_longcat_chunk(cfg, tf, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage()), tf


def _loss(model, tf, batch):
    """One micro-batch through megatron's schedule: this rank's token-sum loss (None off the last
    pipeline stage)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        out = m(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output):
            total = output.float().sum()
            return total, torch.tensor(output.numel()), {"loss": total.detach()}

        return out, loss_func

    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=batch["tokens"].shape[1], micro_batch_size=batch["tokens"].shape[0],
        forward_only=False)
    return float(store[0]["loss"]) if store else None


def _reference():
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing

    out = {}
    for name in ("ple", "plne"):
        runtime.initialize(seed=13)
        model, tf = _build(name, {})
        full = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        loss = _loss(model, tf, _batch())
        grads = {k: g.clone() for k, g in parallel_slicing.split_stacked_experts(
            (n, p.grad) for n, p in model.named_parameters()) if g is not None}
        out[name] = (full, loss, grads)
    return pack(out)


def _layouts(reference, layouts):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing
    from longcat_megatron.training.loop import batch_on_this_cp_rank

    refs = unpack(reference)
    results = []
    for label, name, layout in layouts:
        full, ref_loss, ref_grads = refs["plne" if name == "plne_td" else name]
        runtime.initialize(seed=99, **layout)
        model, tf = _build(name, layout)
        parallel_slicing.load_full_state_dict(model, full)
        batch = _batch()
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        b = BATCH // dp
        batch = {k: v[dp_rank * b:(dp_rank + 1) * b] for k, v in batch.items()}
        if ps.get_context_parallel_world_size() > 1:
            batch = batch_on_this_cp_rank(batch)
        loss = _loss(model, tf, batch)
        dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        if loss is not None:
            total = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(total, group=dp_cp)           # token sums add up over DP x CP
            loss = float(total)
        # gradients as megatron's DDP leaves them in token-sum units: summed over their replicas
        worst, checked, per_layer = 0.0, 0, 0
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for pname, p in model.named_parameters():
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            if getattr(p, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
                dist.all_reduce(got, group=ps.get_tensor_model_parallel_group())
            group = dp_cp if getattr(p, "allreduce", True) else ps.get_expert_data_parallel_group()
            dist.all_reduce(got, group=group)
            for key, piece in parallel_slicing.split_stacked_experts([(pname, got)]):
                want = parallel_slicing.shard(model, key, ref_grads[parallel_slicing.full_key(model, key)])
                worst = max(worst, float((piece - want).abs().max()) / scale)
                checked += 1
                per_layer += ".per_layer_embedding." in key and float(want.abs().max()) > 0
        tables = [m for n, m in model.named_modules() if n.endswith("per_layer_embedding")]
        results.append({"layout": label, "name": name, "loss": loss, "ref_loss": ref_loss,
                        "grads": worst, "checked": checked, "per_layer_grads": per_layer,
                        "rows": [(t.row_start, t.row_end) for t in tables if hasattr(t, "row_start")]})
    return results


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference, 1)[0]


def test_parallel_layouts_equal_single_process(reference):
    results = run_distributed(_layouts, 2, reference, LAYOUTS, timeout=400)
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            print(rank, r)
            if r["loss"] is not None:
                assert abs(r["loss"] - r["ref_loss"]) / abs(r["ref_loss"]) < 1e-5, r
            assert r["grads"] < 1e-5, r
            assert r["checked"] > 0 and r["per_layer_grads"] > 0, r
    assert any(r["loss"] is not None for r in results[1] if r["layout"] == "pp2")
    # tensor_data (EP2, TP1): each rank holds its half of every MLP's hashed table
    (ep0,), (ep1,) = ([r for r in rank if r["layout"] == "ep2"] for rank in results)
    for (a0, a1), (b0, b1) in zip(ep0["rows"], ep1["rows"]):
        assert a0 == 0 and a1 == b0 and b1 == 1280


# ------------------------------------------------------------ training: TP2 -> TP1 resume, to_hf
STEPS = ["train.train_iters=6", "schedule.warmup_iters=1"]


def _layer_table(result):
    tables = [v for k, v in result["weights"].items()
              if k.endswith("layers.0.mlps_0.per_layer_embedding.ngram_tables")]
    return tables[0]


def test_resume_at_another_tp_and_no_hf_export(tmp_path):
    """TP2 run saved at 3: resumed at TP1 (tables resharded) within 1e-5, at TP2 bitwise; no HF export."""
    from ckpt_convert import ConversionError
    from ckpt_convert.to_hf import convert

    ckpt = tmp_path / "ckpt"
    save = [f"checkpoint.save={ckpt}", "checkpoint.save_interval=3"]
    straight = run_distributed(run_training, 2, STEPS + save, TINY_PLNE, timeout=300)
    losses = straight[0]["losses"]
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.05, losses
    # go back to the step-3 checkpoint (what an operator does by pointing the tracker at it)
    shutil.rmtree(ckpt / "iter_0000006")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = run_distributed(run_training, 1, STEPS + save + [
        "parallel.tensor=1", "parallel.sequence_parallel=false"], TINY_PLNE, timeout=300)[0]
    assert resumed["resumed_from"] == 3
    assert _layer_table(resumed).shape[0] == sum(_layer_table(r).shape[0] for r in straight)
    for it in (4, 5, 6):
        assert abs(resumed["losses"][it] - losses[it]) <= 1e-5 * abs(losses[it]), (
            it, resumed["losses"][it], losses[it])
    # and at the saved layout (TP2 + SP): bitwise the uninterrupted run, losses and weights
    shutil.rmtree(ckpt / "iter_0000006")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    same = run_distributed(run_training, 2, STEPS + save, TINY_PLNE, timeout=300)
    for rank, r in enumerate(same):
        assert r["resumed_from"] == 3
        assert r["losses"] == {k: v for k, v in straight[rank]["losses"].items() if k > 3}, rank
        assert r["weights"].keys() == straight[rank]["weights"].keys()
        for k, v in straight[rank]["weights"].items():
            assert r["weights"][k].equal(v), (rank, k)
    with pytest.raises(ConversionError, match=r"model\.per_layer_embedding='plne'"):
        convert(str(ckpt), str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides,match", [
    (dict(per_layer_embedding="both"), r"model\.per_layer_embedding='both': use one of none, ple, plne"),
    (dict(per_layer_embedding="plne"), r"model\.per_layer_embedding=plne needs .*model\.per_layer_ngram"),
    (dict(per_layer_embedding="ple", arch="gpt"), r"model\.per_layer_embedding='ple' .* arch: longcat"),
    (dict(per_layer_ngram="set"), r"model\.per_layer_ngram is set but model\.per_layer_embedding=none"),
    (dict(per_layer_embedding="ple", per_layer_ngram="set"), r"model\.per_layer_embedding=ple"),
    (dict(per_layer_embedding="plne", per_layer_ngram=dict(emb_split_num=5, emb_neighbor_num=2)),
     r"model\.ffn_hidden_size=48 is not divisible .*model\.per_layer_ngram\.emb_split_num"),
    (dict(per_layer_embedding="plne", per_layer_ngram=dict(partition="rows")),
     r"model\.per_layer_ngram\.partition"),
])
def test_bad_config_names_the_field(overrides, match):
    overrides = dict(overrides)
    ng = overrides.pop("per_layer_ngram", None)
    if ng is not None:
        overrides["per_layer_ngram"] = ngram_config(**({} if ng == "set" else ng))
    cfg = dataclasses.replace(tiny_config(), **overrides)
    with pytest.raises(UserInputError, match=match):
        cfg.validate()


def test_shipped_config_and_eos_check():
    from longcat_megatron.config import ConfigError, load_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", NgramRuleWarning)
        cfg = load_config(TINY_PLNE).model
    assert cfg.per_layer_embedding == "plne" and cfg.layer_ngram().partition == "tensor"
    assert load_config(TINY_PLNE, ["model.per_layer_embedding=none", "model.per_layer_ngram=null"]
                       ).model.per_layer_embedding == "none"
    with pytest.raises(ConfigError, match=r"model\.per_layer_ngram\.eos_token_id=3 .* set "
                                          r"model\.per_layer_ngram\.eos_token_id=2"):
        load_config(TINY_PLNE, ["model.per_layer_ngram.eos_token_id=3"])
