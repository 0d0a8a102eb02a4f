"""LongCat with the N-gram Embedding as input embedding (model.ngram):

* our model == transformers' LongcatFlash backbone fed with a plain transcription of the released
  ``NgramEmbedding`` forward, on the same weights (fp32 logits), and the HF key mapping (uneven
  sub-table row ranges of the concatenated table) round-trips;
* TP=2 + SP == one process (logits, loss with MTP/z-loss/LB loss, gradients of every parameter);
* the training loop trains it at TP=2, and a TP=2 checkpoint resumes at TP=1 (tables resharded from
  2 row shards to 1) with the next losses equal to an uninterrupted run.
"""

import os

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import pack, tiny_config, unpack
from tests.test_ngram_embedding import shift_right_ignore_eos
from tests.train_utils import ROOT, run_training

RATIO, N, K, EOS = 3.3, 3, 2, 2    # hidden 32 -> 4 sub-tables of width 8, 317..323 rows (V = 96)
SEQ, BATCH = 16, 4
AUX = dict(mtp_num_layers=1, z_loss_coeff=1e-3, budget_target_ffn_experts=2.0,
           device_lb_loss_coeff=1e-2, device_lb_groups=2)
TINY_NGRAM = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")


def ngram_config(**overrides):
    from longcat_megatron.model.ngram_config import NgramConfig

    return NgramConfig(**{**dict(ngram_vocab_size_ratio=RATIO, emb_neighbor_num=N, emb_split_num=K,
                                 eos_token_id=EOS), **overrides})


def tokens(seed, batch=BATCH, seq=SEQ, vocab=96):
    """[b, s+1] token ids with EOS inside (documents) and one EOS right at the end of a row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (batch, seq + 1), generator=g)
    x[torch.rand(batch, seq + 1, generator=g) < 0.15] = EOS
    x[0, seq - 1] = EOS
    return x


# --------------------------------------------------------------- released forward, transcribed
def released_ngram_embedding(input_ids, embed_tokens, embedders, post_projs, vocab_size):
    """modeling_longcat_ngram.NgramEmbedding.forward (no cache) written out plainly."""
    x = embed_tokens(input_ids)
    shifted = {s + 1: shift_right_ignore_eos(input_ids, s, EOS) for s in range(1, N)}
    for n in range(2, N + 1):
        for k in range(K):
            idx = (n - 2) * K + k
            mod = int(RATIO * vocab_size + 2 * idx + 1)
            ngram, power = input_ids.clone(), 1
            for s in range(1, n):
                power = (power * vocab_size) % mod
                ngram = ngram + shifted[s + 1] * power
            x = x + post_projs[idx](embedders[idx](ngram % mod))
    return x / (1 + K * (N - 1))


def _parity_with_transformers():
    import torch
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    from longcat_megatron import runtime
    from longcat_megatron.model import hf_mapping
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(seed=5)
    cfg = tiny_config(ngram=ngram_config())
    kwargs = hf_mapping.hf_config_kwargs(cfg)
    ngram_fields = {k: kwargs.pop(k) for k in ("model_type", "ngram_vocab_size_ratio",
                                               "emb_neighbor_num", "emb_split_num")}
    torch.manual_seed(5)
    ref = LongcatFlashForCausalLM(LongcatFlashConfig(**kwargs, initializer_range=0.2,
                                                     attn_implementation="eager")).eval()
    with torch.no_grad():   # spread routing scores so that both expert kinds are picked
        for layer in ref.model.layers:
            layer.mlp.router.classifier.weight.normal_(0, 1.0)
    g = torch.Generator().manual_seed(9)
    moduli = cfg.ngram.moduli(cfg.vocab_size)
    width = cfg.hidden_size // len(moduli)
    embedders = [torch.nn.Embedding(m, width) for m in moduli]
    post_projs = [torch.nn.Linear(width, cfg.hidden_size, bias=False) for _ in moduli]
    with torch.no_grad():
        for e in embedders:
            e.weight.copy_(torch.randn(e.weight.shape, generator=g))
        for p in post_projs:
            p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.3)

    files = hf_mapping.from_transformers_memory_layout(ref.state_dict(), cfg)
    for i, (e, p) in enumerate(zip(embedders, post_projs)):
        files[f"model.ngram_embeddings.embedders.{i}.weight"] = e.weight.detach()
        files[f"model.ngram_embeddings.post_projs.{i}.weight"] = p.weight.detach()
    ours = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True,
                               post_process=True).eval()
    state = hf_mapping.hf_to_megatron(files, cfg)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    back = hf_mapping.megatron_to_hf(ours.state_dict(), cfg)
    round_trip = set(back) == set(files) and all(torch.equal(back[k], files[k]) for k in files)
    ranges_agree = ([(a, b) for _, a, b in hf_mapping.ngram_table_rows(cfg)]
                    == ours.embedding.table_row_ranges())

    ids = tokens(seed=4)[:, :-1]
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    with torch.no_grad():
        embeds = released_ngram_embedding(ids, ref.model.embed_tokens, embedders, post_projs,
                                          cfg.vocab_size)
        want = ref(inputs_embeds=embeds).logits
        got = ours(ids, pos, None)
        # the plain backbone alone differs: the n-gram part matters at this scale
        plain = ref(input_ids=ids).logits
    rel = float((got - want).abs().max() / want.abs().max())
    plain_rel = float((plain - want).abs().max() / want.abs().max())
    return rel, plain_rel, round_trip, ranges_agree, ngram_fields, sorted(set(moduli))


def test_logits_equal_transformers_with_released_ngram_forward():
    rel, plain_rel, round_trip, ranges_agree, fields, moduli = run_distributed(
        _parity_with_transformers, 1)[0]
    print(f"max rel logit err {rel:.2e} (without the n-gram part: {plain_rel:.2e})")
    assert rel < 1e-5
    assert plain_rel > 1e-2
    assert round_trip and ranges_agree
    assert fields == {"model_type": "longcat_flash_ngram", "ngram_vocab_size_ratio": RATIO,
                      "emb_neighbor_num": N, "emb_split_num": K}
    assert moduli == [317, 319, 321, 323]   # int(3.3 * 96) + 2i + 1


# ------------------------------------------------------------------------ TP=2 + SP == 1 process
def _reference_run():
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing
    from tests.test_longcat_parallel import _build, _run_schedule

    runtime.initialize(seed=13)
    cfg = tiny_config(**AUX, ngram=ngram_config())
    model, tf = _build(cfg, per_token=True)
    batch = tokens(seed=6)
    ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    full = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.eval()
    logits = _run_schedule(model, tf, ids, labels, forward_only=True)
    model.train()
    loss = _run_schedule(model, tf, ids, labels, forward_only=False)
    grads = {k: g.clone() for k, g in parallel_slicing.split_stacked_experts(
        (n, p.grad) for n, p in model.named_parameters()) if g is not None}
    return pack((full, logits, loss, grads))


def _tp2_run(reference, partition):
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import parallel_slicing
    from tests.test_longcat_parallel import _build, _reduce_like_ddp, _run_schedule

    full, ref_logits, ref_loss, ref_grads = unpack(reference)
    runtime.initialize(tensor=2)
    cfg = tiny_config(**AUX, ngram=ngram_config(partition=partition))
    model, tf = _build(cfg, tensor=2, per_token=True)
    emb = model.embedding
    rows = slice(emb.row_start, emb.row_end)
    # (parallel_slicing splits the table like torch.chunk, = NgramEmbedding's rows for TP=2)
    parallel_slicing.load_full_state_dict(model, full)
    with torch.no_grad():
        emb.ngram_tables.copy_(full["embedding.ngram_tables"][rows])
    batch = tokens(seed=6)
    ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    model.eval()
    logits = _run_schedule(model, tf, ids, labels, forward_only=True)
    model.train()
    loss = _run_schedule(model, tf, ids, labels, forward_only=False)
    _reduce_like_ddp(model)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    worst = {}
    for name, got in parallel_slicing.split_stacked_experts(
            (n, p.grad) for n, p in model.named_parameters()):
        want = ref_grads[name]
        want = want[rows] if name == "embedding.ngram_tables" else parallel_slicing.shard(model, name, want)
        worst[name] = float((got - want).abs().max()) / scale
    return {"logits": float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
            "loss": (float(loss), float(ref_loss)), "grads": worst,
            "table_rows": (emb.row_start, emb.row_end, emb.total_rows),
            "table_grad_rows_hit": int((emb.ngram_tables.grad.abs().sum(1) > 0).sum())}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_run, 1)[0]


@pytest.mark.parametrize("partition", ["tensor", "tensor_data"])
def test_tp2_sequence_parallel_equals_single_process(reference, partition):
    """Tables row-sharded over TP (masked lookup + reduce-scatter) or over the expert-TP x EP group
    (= the 2 TP ranks here; all-to-all of ids and rows)."""
    results = run_distributed(_tp2_run, 2, reference, partition, timeout=300)
    print(partition, "loss", results[0]["loss"], "logits rel err", results[0]["logits"],
          "max grad err", max(max(r["grads"].values()) for r in results))
    for r in results:
        got, want = r["loss"]
        assert abs(got - want) / abs(want) < 1e-5, r["loss"]
        assert r["logits"] < 1e-5
        bad = {k: v for k, v in r["grads"].items() if not v < 1e-5}
        assert not bad, bad
        assert "embedding.ngram_tables" in r["grads"] and "embedding.post_projs.3.weight" in r["grads"]
        assert r["table_grad_rows_hit"] > 0
    # the two ranks hold complementary halves of the concatenated table
    (a0, a1, total), (b0, b1, _) = (r["table_rows"] for r in results)
    assert a0 == 0 and a1 == b0 and b1 == total


# ------------------------------------------------------------------------- training loop + resume
STEPS = ["train.train_iters=6", "schedule.warmup_iters=1", "checkpoint.save=null"]
TP1 = ["parallel.tensor=1", "parallel.sequence_parallel=false"]


def _table(result):
    (table,) = [v for k, v in result["weights"].items() if k.endswith("embedding.ngram_tables")]
    return table


def test_trains_at_tp2_and_resumes_at_tp1_with_resharded_tables(tmp_path):
    straight = run_distributed(run_training, 2, STEPS, TINY_NGRAM, timeout=300)
    losses = straight[0]["losses"]
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.05, losses
    tables = [_table(r).shape[0] for r in straight]

    ckpt = f"checkpoint.save={tmp_path / 'ckpt'}"
    first = run_distributed(run_training, 2, STEPS + [ckpt, "train.exit_interval=3"], TINY_NGRAM,
                            timeout=300)
    assert first[0]["iteration"] == 3
    resumed = run_distributed(run_training, 1, STEPS + TP1 + [ckpt], TINY_NGRAM, timeout=300)[0]
    assert resumed["resumed_from"] == 3
    whole = _table(resumed).shape[0]
    assert whole == sum(tables) and len(set(tables)) == 1   # 2 row shards -> 1 table
    for it in (4, 5, 6):
        assert abs(resumed["losses"][it] - losses[it]) <= 1e-5 * abs(losses[it]), (
            it, resumed["losses"][it], losses[it])
