"""NgramEmbedding == a plain transcription of the released forward; sharded == unsharded (outputs
and the gradient of every row) for TP=2/4 with and without SP, the tensor x data partition on 4
processes, and CP=2 chunks (halo) == CP=1."""

import pytest
import torch

from tests.harness import run_distributed

V, H, RATIO, N, K, EOS = 256, 48, 3.3, 3, 3, 2   # 6 sub-tables of width 8, ~850 rows each
T = K * (N - 1)
D = H // T
BATCH, SEQ = 4, 16


# ------------------------------------------------------------------- released forward, transcribed
def shift_right_ignore_eos(x, s, eos):
    """Shift right by s inside EOS-terminated segments; vacated places are 0 (HF-NG)."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        seg_start = 0
        for p in range(x.shape[1]):
            if p - s >= seg_start:
                out[b, p] = x[b, p - s]
            if int(x[b, p]) == eos:
                seg_start = p + 1
    return out


class ReleasedNgramEmbedding(torch.nn.Module):
    """modeling_longcat_ngram.NgramEmbedding, written out plainly (nn.Embedding + nn.Linear)."""

    def __init__(self):
        super().__init__()
        m = RATIO * V
        self.embed_tokens = torch.nn.Embedding(V, H)
        self.embedders = torch.nn.ModuleList(torch.nn.Embedding(int(m + 2 * i + 1), D) for i in range(T))
        self.post_projs = torch.nn.ModuleList(torch.nn.Linear(D, H, bias=False) for _ in range(T))

    def forward(self, input_ids, ngram_context=None):
        seq_len = input_ids.shape[-1]
        context = input_ids if ngram_context is None else torch.cat(
            [ngram_context[..., -(N - 1):], input_ids], dim=-1)
        x = self.embed_tokens(input_ids)
        shifted = {s + 1: shift_right_ignore_eos(context, s, EOS) for s in range(1, N)}
        for n in range(2, N + 1):
            for k in range(K):
                idx = (n - 2) * K + k
                mod = int(RATIO * V + 2 * idx + 1)
                mods, p = [], 1
                for _ in range(n - 1):
                    p = (p * V) % mod
                    mods.append(p)
                ng = context.clone()
                for s in range(1, n):
                    ng = ng + shifted[s + 1] * mods[s - 1]
                new_ids = (ng % mod)[..., -seq_len:]
                x = x + self.post_projs[idx](self.embedders[idx](new_ids))
        return x / (1 + T)


def reference_weights(seed=7):
    g = torch.Generator().manual_seed(seed)
    word = torch.randn(V, H, generator=g) * 0.5
    tables = [torch.randn(int(RATIO * V + 2 * i + 1), D, generator=g) for i in range(T)]
    projs = [torch.randn(H, D, generator=g) * 0.3 for _ in range(T)]
    return word, tables, projs


def reference_model(seed=7):
    ref = ReleasedNgramEmbedding()
    word, tables, projs = reference_weights(seed)
    with torch.no_grad():
        ref.embed_tokens.weight.copy_(word)
        for e, t in zip(ref.embedders, tables):
            e.weight.copy_(t)
        for p, w in zip(ref.post_projs, projs):
            p.weight.copy_(w)
    return ref


def inputs(seed=3, batch=BATCH, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (batch, seq), generator=g)
    x[torch.rand(batch, seq, generator=g) < 0.15] = EOS
    x[:, 0] = 1
    grad_out = torch.randn(seq, batch, H, generator=g)   # loss = sum(out * grad_out), out [s, b, h]
    return x, grad_out


def reference_outputs_and_grads(x, grad_out):
    ref = reference_model()
    out = ref(x).transpose(0, 1)
    (out * grad_out).sum().backward()
    return out.detach(), {
        "word": ref.embed_tokens.weight.grad,
        "tables": torch.cat([e.weight.grad for e in ref.embedders]),
        "projs": torch.stack([p.weight.grad for p in ref.post_projs]),
    }


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------- module under test
def build_embedding(tp=1, sp=False, partition="tensor", context=1, amplification="none",
                    load_reference=True):
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.ngram_config import NgramConfig
    from longcat_megatron.model.ngram_embedding import NgramEmbedding

    tf = transformer_config(ModelConfig(hidden_size=H, num_attention_heads=4, vocab_size=V),
                            tensor=tp, context=context, sequence_parallel=sp)
    cfg = NgramConfig(ngram_vocab_size_ratio=RATIO, emb_neighbor_num=N, emb_split_num=K,
                      eos_token_id=EOS, partition=partition, amplification=amplification)
    emb = NgramEmbedding(tf, V, cfg, max_sequence_length=SEQ)
    if load_reference:
        emb.load_full_weights(*reference_weights())
    return emb


def _single_process_checks():
    from longcat_megatron import runtime

    runtime.initialize()
    x, grad_out = inputs()
    ref_out, ref_grads = reference_outputs_and_grads(x, grad_out)
    emb = build_embedding()
    out = emb(x, None)
    assert out.shape == (SEQ, BATCH, H)
    assert rel_err(out, ref_out) < 1e-6
    (out * grad_out).sum().backward()
    assert rel_err(emb.ngram_tables.grad, ref_grads["tables"]) < 1e-6
    assert rel_err(emb.word_embeddings.weight.grad, ref_grads["word"]) < 1e-6
    # cached decode: last 4 tokens with the previous N-1 as context == same positions of the whole
    ref = reference_model()
    step = emb(x[:, -4:], None, ngram_context=x[:, -4 - (N - 1):-4])
    assert rel_err(step, ref(x).transpose(0, 1)[-4:]) < 1e-6
    # amplification: x sqrt(H) of the released output
    amp = build_embedding(amplification="sqrt")
    assert rel_err(amp(x, None), ref_out * H ** 0.5) < 1e-6


def _init_slices():
    """The initial table rows at TP=2 and the whole table at TP=1, same seed."""
    from longcat_megatron import runtime

    runtime.initialize(tensor=2, seed=11)
    part = build_embedding(tp=2, load_reference=False)
    part = (part.row_start, part.ngram_tables.detach().clone(),
            torch.stack([p.weight.detach() for p in part.post_projs]))
    runtime.initialize(tensor=1, seed=11)
    full = build_embedding(tp=1, load_reference=False)
    return part, (full.ngram_tables.detach(), torch.stack([p.weight.detach() for p in full.post_projs]))


# ------------------------------------------------------------------------- distributed workers
def _grads_after_reduction(emb, sp):
    """Gradients as megatron's DDP + finalize_model_grads would leave them (sum, not average):
    dense params summed over DP x CP, SP params also over TP, table shards over their replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    tp = ps.get_tensor_model_parallel_group()
    word = emb.word_embeddings.weight.grad.clone()
    dist.all_reduce(word, group=dp_cp)
    projs = torch.stack([p.weight.grad for p in emb.post_projs]).clone()
    dist.all_reduce(projs, group=dp_cp)
    if sp:
        dist.all_reduce(projs, group=tp)
    tables = emb.ngram_tables.grad.clone()
    dist.all_reduce(tables, group=emb.replica_group)
    return {"word": (emb.word_embeddings.vocab_start_index, word), "tables": (emb.row_start, tables),
            "projs": projs}


def _run_layout(tp, sp, partition, expert=1, context=1):
    """One forward/backward of the global batch split over DP (and SP / CP); returns what this rank
    holds, with its coordinates."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from longcat_megatron import runtime

    runtime.initialize(tensor=tp, expert=expert, context=context)
    x, grad_out = inputs()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    b = BATCH // dp
    x = x[dp_rank * b:(dp_rank + 1) * b]
    grad_out = grad_out[:, dp_rank * b:(dp_rank + 1) * b]
    positions = torch.arange(SEQ).unsqueeze(0)
    if context > 1:
        got = get_batch_on_this_cp_rank({"tokens": x, "positions": positions})
        x, positions = got["tokens"], got["positions"]
        grad_out = grad_out[positions[0]]
    tp_rank = ps.get_tensor_model_parallel_rank()
    if sp:
        grad_out = grad_out.chunk(tp, dim=0)[tp_rank]
        positions = positions.chunk(tp, dim=1)[tp_rank]
    emb = build_embedding(tp=tp, sp=sp, partition=partition, context=context)
    ids = emb.compute_ngram_ids(x)
    out = emb(x, positions)
    (out * grad_out).sum().backward()
    return {"out": out.detach(), "batch": (dp_rank * b, b), "positions": positions[0], "ids": ids,
            "grads": _grads_after_reduction(emb, sp), "shard_group_size": emb.shard_size,
            "table_rows": emb.ngram_tables.shape[0]}


def _layouts(layouts, extra_checks=False):
    out = [_run_layout(*layout) for layout in layouts]
    if extra_checks:
        _single_process_checks()          # unsharded module (TP=1) on each of the 2 ranks
        out.append(_init_slices())
    return out


LAYOUTS_2 = [(2, False, "tensor"), (2, True, "tensor"), (2, True, "tensor_data", 1),
             (1, False, "tensor", 1, 2), (1, False, "tensor_data", 2),
             (1, False, "tensor_data", 2, 2)]
LAYOUTS_4 = [(4, False, "tensor"), (4, True, "tensor"),
             (2, False, "tensor_data", 2), (2, True, "tensor_data", 2),
             (1, False, "tensor_data", 4), (2, True, "tensor", 1, 2), (2, True, "tensor_data", 2, 2)]


def check_against_reference(ranks, name):
    x, grad_out = inputs()
    ref_out, ref_grads = reference_outputs_and_grads(x, grad_out)
    total_rows = ref_grads["tables"].shape[0]
    for r in ranks:
        b0, b = r["batch"]
        expect = ref_out[:, b0:b0 + b][r["positions"]]
        assert rel_err(r["out"], expect) < 1e-6, (name, "output")
        g = r["grads"]
        start, word = g["word"]
        assert rel_err(word, ref_grads["word"][start:start + word.shape[0]]) < 1e-6, (name, "word")
        start, tables = g["tables"]
        assert rel_err(tables, ref_grads["tables"][start:start + tables.shape[0]]) < 2e-6, (name, "rows")
        assert rel_err(g["projs"], ref_grads["projs"]) < 1e-6, (name, "projections")
    covered = sorted({(r["grads"]["tables"][0], r["table_rows"]) for r in ranks})
    assert sum(n for _, n in covered) == total_rows, (name, "every row owned exactly once")


@pytest.fixture(scope="module")
def two_process_results():
    return run_distributed(_layouts, 2, LAYOUTS_2, True, timeout=400)


def test_single_process_matches_released_forward(two_process_results):
    """Checked inside the ranks by _single_process_checks (output, grads, decode, amplification)."""
    assert len(two_process_results) == 2


def test_init_is_independent_of_sharding(two_process_results):
    for rank in two_process_results:
        (start, rows, projs), (full, full_projs) = rank[-1]
        assert torch.equal(rows, full[start:start + rows.shape[0]])
        assert torch.equal(projs, full_projs)


def test_tp2_sp_cp2_and_tensor_data_on_2_processes(two_process_results):
    results = two_process_results
    for i, layout in enumerate(LAYOUTS_2):
        check_against_reference([rank[i] for rank in results], layout)
    # CP=2: each rank's ids are the whole-sequence ids at its (non-contiguous) positions
    from longcat_megatron.model.ngram_ids import ngram_ids

    x, _ = inputs()
    full_ids = ngram_ids(x, vocab_size=V, ratio=RATIO, max_n=N, splits=K, eos_token_id=EOS)
    cp_index = LAYOUTS_2.index((1, False, "tensor", 1, 2))
    for rank in results:
        r = rank[cp_index]
        assert torch.equal(r["ids"], full_ids[:, :, r["positions"]])


def test_tp4_and_tensor_data_on_4_processes():
    results = run_distributed(_layouts, 4, LAYOUTS_4, timeout=600)
    for i, layout in enumerate(LAYOUTS_4):
        check_against_reference([rank[i] for rank in results], layout)
    data_layout = LAYOUTS_4.index((1, False, "tensor_data", 4))
    # larger group: every rank holds ~1/4 of the rows
    sizes = [rank[data_layout]["table_rows"] for rank in results]
    assert max(sizes) - min(sizes) <= 1 and results[0][data_layout]["shard_group_size"] == 4
