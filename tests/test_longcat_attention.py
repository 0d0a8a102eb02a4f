"""Attention backends of the LongCat MLA: ``sdpa`` (torch's fused kernels) == ``eager`` (explicit fp32
scores) on logits and every gradient (max error / max reference value; fp32, 1e-6), in one process
and at CP=2; and SDPA
really avoids the ``s x s`` score tensor (MLA's q·k head dim differs from its v head dim, which
would send torch to the math fallback if v were not padded).

Packed documents as a ``DocumentMask`` (document starts, no dense mask): equal to the dense mask it
stands for (both backends, one layout for every sample or one per sample, logits and gradients),
each document's logits equal that document run alone (positions restarted), and no tensor of
``s x s`` elements appears.

Per-document attention in one varlen call (CUDA's flash kernel; here its stand-in
``attention.varlen_reference``, which asserts the kernel's input contract): the cu_seqlens built
from a ``DocumentMask`` allow exactly what the dense mask allows (whole sequence and CP query
chunks), the dispatch picks varlen only where torch's flash kernel applies, and the model with the
varlen path equals the per-piece path (logits and every gradient, fp32, 1e-6; CP=1 and CP=2, with
and without selective recompute) in one kernel call per MLA block (CP=1) or per query chunk and
sample (CP=2).
"""

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import YARN, tiny_config

SEQ, BATCH, EOS = 16, 2, 2
AUX = dict(mtp_num_layers=1, z_loss_coeff=1e-3)


def _batch(doc_mask: bool):
    """Tokens (EOS inside), labels, position ids and, with ``doc_mask``, a document mask."""
    import torch

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (BATCH, SEQ + 1), generator=g)
    ids[torch.rand(BATCH, SEQ + 1, generator=g) < 0.15] = EOS
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    batch = {"tokens": tokens, "labels": labels,
             "position_ids": torch.arange(SEQ)[None].expand(BATCH, -1).contiguous(),
             "attention_mask": None}
    if doc_mask:
        doc = torch.zeros(BATCH, SEQ, dtype=torch.long)
        doc[:, 1:] = (tokens[:, :-1] == EOS).long().cumsum(1)
        allowed = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None] & (doc[:, :, None] == doc[:, None, :])
        batch["attention_mask"] = (~allowed)[:, None]                  # [b, 1, s, s], True = masked
    return batch


def _logits_and_grads(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"]).clone()
    model.train()
    model.zero_grad()
    loss = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"])
    loss.float().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for _, router in model.routers():   # no controller step between the two backends
        router.step_picks.zero_()
        router.step_tokens.zero_()
        router.step_entropy.zero_()
    return logits, grads


def _compare_backends(context: int, cases: list):
    """Worst relative difference (logits, any gradient) of sdpa vs eager on the same weights."""
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(context=context, seed=13)
    out = {}
    for name, overrides, doc_mask in cases:
        cfg = tiny_config(**overrides, attention_backend="eager")
        model = build_longcat_chunk(cfg, transformer_config(cfg, context=context),
                                    pre_process=True, post_process=True)
        batch = _batch(doc_mask)
        if context > 1:
            batch = get_batch_on_this_cp_rank(batch)
        ref_logits, ref_grads = _logits_and_grads(model, batch)
        cfg.attention_backend = "sdpa"    # every module reads the shared ModelConfig
        logits, grads = _logits_and_grads(model, batch)
        assert set(grads) == set(ref_grads) and len(grads) > 20
        # Every gradient's max error relative to the gradient scale (the largest reference
        # gradient), as in the parallel-parity tests; per tensor, the router weights (fp32
        # softmax routing) reach 2e-6 of their own maximum, the kernels summing in another order.
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        worst_grad = max(float((grads[k] - g).abs().max()) for k, g in ref_grads.items()) / scale
        out[name] = (float((logits - ref_logits).abs().max() / ref_logits.abs().max()), worst_grad)
    return out


CASES = [("plain_mtp", AUX, False), ("yarn_docmask_mtp", {**AUX, **YARN}, True)]
PROBE_SEQ = 256


def _all_checks():
    """Everything in one pair of processes (start-up dominates): CP=2, then CP=1 (each rank
    alone on the whole sequence), then the score-matrix probe, then the document masks."""
    return {"cp2": _compare_backends(2, CASES), "varlen_cp2": _varlen_checks(2),
            "cp1": _compare_backends(1, CASES), "varlen_cp1": _varlen_checks(1),
            "probe": _largest_attention_tensors(PROBE_SEQ), "documents": _document_checks()}


def _varlen_checks(context: int):
    """Per layout and recompute: worst relative difference of the varlen path (stand-in kernel)
    vs the per-piece path (logits, gradients), and the kernel calls of one forward per MLA block."""
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    from longcat_megatron import runtime
    from longcat_megatron.model import attention
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(context=context, seed=17)
    whole = _batch(False)
    layouts = {"per_sample": DocumentMask.from_eod(whole["tokens"], EOS),
               "shared": DocumentMask.from_starts([[0, 6, 7, 12]] * BATCH, SEQ)}
    batch = get_batch_on_this_cp_rank(whole) if context > 1 else whole   # the mask stays whole
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape[0])
        return attention.varlen_reference(*args, **kwargs)

    out = {}
    for recompute in ("none", "selective"):
        cfg = tiny_config(**AUX, **YARN)
        model = build_longcat_chunk(cfg, transformer_config(cfg, context=context, recompute=recompute),
                                    pre_process=True, post_process=True)
        blocks = []   # MLA blocks run by one forward (the MTP head's runs with labels only)
        for m in model.modules():
            if isinstance(m, attention.LongcatMLA):
                m.register_forward_hook(lambda *_: blocks.append(1))
        for layout, documents in layouts.items():
            case = {**batch, "attention_mask": documents}
            with attention.document_attention("pieces"):
                ref_logits, ref_grads = _logits_and_grads(model, case)
            calls.clear()
            with attention.document_attention("varlen", kernel=kernel):
                blocks.clear()
                model.eval()
                with torch.no_grad():
                    model(case["tokens"], case["position_ids"], documents)
                forward_calls, forward_blocks = len(calls), len(blocks)
                logits, grads = _logits_and_grads(model, case)
            scale = max(float(g.abs().max()) for g in ref_grads.values())
            out[recompute, layout] = dict(
                logits=float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
                grads=max(float((grads[k] - g).abs().max()) for k, g in ref_grads.items()) / scale,
                same_keys=set(grads) == set(ref_grads), calls_per_block=forward_calls / forward_blocks,
                queries_per_call=sorted(set(calls)))
    return out


def _document_checks():
    """Per backend and layout: worst relative difference of DocumentMask vs its dense mask
    (logits, gradients), and of each document's logits vs that document alone."""
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(seed=21)
    batch = _batch(False)
    layouts = {"per_sample": DocumentMask.from_eod(batch["tokens"], EOS),
               "shared": DocumentMask.from_starts([[0, 6, 7, 12]] * BATCH, SEQ)}
    assert not layouts["per_sample"].same_for_every_sample and len(layouts["per_sample"].starts[0]) > 1
    out = {}
    for backend in ("sdpa", "eager"):
        cfg = tiny_config(**AUX, attention_backend=backend)
        model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
        for layout, documents in layouts.items():
            pos = torch.arange(SEQ)[None].repeat(BATCH, 1)
            for i, starts in enumerate(documents.starts):      # positions restart per document
                for start, end in zip(starts, starts[1:] + (SEQ,)):
                    pos[i, start:end] = torch.arange(end - start)
            case = {**batch, "position_ids": pos}
            ref_logits, ref_grads = _logits_and_grads(model, {**case, "attention_mask": documents.dense()})
            logits, grads = _logits_and_grads(model, {**case, "attention_mask": documents})
            scale = max(float(g.abs().max()) for g in ref_grads.values())
            alone = 0.0
            model.eval()
            with torch.no_grad():
                for i, starts in enumerate(documents.starts):
                    for start, end in zip(starts, starts[1:] + (SEQ,)):
                        one = model(batch["tokens"][i:i + 1, start:end],
                                    torch.arange(end - start)[None], None)
                        alone = max(alone, float((one[0] - logits[i, start:end]).abs().max()))
            out[backend, layout] = dict(
                logits=float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
                grads=max(float((grads[k] - g).abs().max()) for k, g in ref_grads.items()) / scale,
                alone=alone / float(ref_logits.abs().max()), same_keys=set(grads) == set(ref_grads))
    out["largest"] = _largest_attention_tensors(PROBE_SEQ, [0, PROBE_SEQ // 4])
    return out


@pytest.fixture(scope="module")
def checks():
    return run_distributed(_all_checks, 2)


@pytest.mark.parametrize("context", [1, 2], ids=["cp1", "cp2"])
def test_sdpa_equals_eager(checks, context):
    for rank, result in enumerate(checks):
        for name, (logits, grads) in result[f"cp{context}"].items():
            print(f"cp={context} rank {rank} {name}: logits {logits:.1e}, worst gradient {grads:.1e}")
            assert logits < 1e-6 and grads < 1e-6, (name, logits, grads)


def _largest_attention_tensors(seq: int, document_starts=None):
    """Per backend: largest tensor (elements) any op creates in one MLA block's fwd + bwd (with a
    ``DocumentMask`` of these starts when given)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from longcat_megatron import runtime
    from longcat_megatron.model.attention import LongcatMLA
    from longcat_megatron.model.document_mask import DocumentMask
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.rotary import InterleavedRotary

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel, self.op = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.op = t.numel(), str(func)
            return result

    runtime.initialize(seed=3)   # (no process group used below)
    cfg = tiny_config()
    mla = LongcatMLA(cfg, transformer_config(cfg)).train()
    x = torch.randn(seq, 1, cfg.hidden_size, requires_grad=True)
    rotary = InterleavedRotary(cfg).angles(torch.arange(seq)[None], x.dtype)
    mask = None if document_starts is None else DocumentMask.from_starts([document_starts], seq)
    out = {}
    for backend in ("sdpa", "eager"):
        cfg.attention_backend = backend
        probe = Largest()
        with probe:
            mla(x, rotary, mask).sum().backward()
        out[backend] = (probe.numel, probe.op)
    return out, cfg.num_attention_heads


def test_sdpa_builds_no_score_matrix(checks):
    seq = PROBE_SEQ
    largest, heads = checks[0]["probe"]
    (sdpa, sdpa_op), (eager, _) = largest["sdpa"], largest["eager"]
    print(f"largest tensor at s={seq}: sdpa {sdpa} ({sdpa_op}), eager {eager}, s*s = {seq * seq}")
    assert eager >= heads * seq * seq          # the probe sees a score matrix when there is one
    assert sdpa < seq * seq, sdpa_op


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["per_sample", "shared"])
def test_document_mask_equals_dense_mask_and_documents_alone(checks, backend, layout):
    for rank, result in enumerate(checks):
        r = result["documents"][backend, layout]
        print(f"rank {rank} {backend} {layout}: {r}")
        assert r["same_keys"]
        assert r["logits"] < 1e-6 and r["grads"] < 1e-6 and r["alone"] < 1e-5, r


def test_document_mask_builds_no_dense_mask_or_score_matrix(checks):
    seq = PROBE_SEQ
    (largest, heads) = checks[0]["documents"]["largest"]
    (sdpa, sdpa_op), (eager, _) = largest["sdpa"], largest["eager"]
    print(f"documents [0, {seq // 4}) + [{seq // 4}, {seq}): largest sdpa {sdpa} ({sdpa_op}), eager {eager}")
    assert eager >= heads * (3 * seq // 4) ** 2     # the probe sees the last document's scores
    assert sdpa < seq * seq, sdpa_op


def test_backend_and_recompute_fields_are_validated():
    from longcat_megatron.config import ConfigError, load_config
    from longcat_megatron.model.config import ModelConfigError

    with pytest.raises(ModelConfigError, match="model.attention_backend='flash'"):
        tiny_config(attention_backend="flash").validate()
    with pytest.raises(ConfigError, match="train.recompute='some'"):
        load_config(overrides=["train.recompute=some"])
    with pytest.raises(ConfigError, match="train.recompute_num_layers=1 needs train.recompute=full"):
        load_config(overrides=["train.recompute=selective", "train.recompute_num_layers=1"])


@pytest.mark.parametrize("context", [1, 2], ids=["cp1", "cp2"])
def test_varlen_path_equals_per_piece_path(checks, context):
    for rank, result in enumerate(checks):
        for (recompute, layout), r in result[f"varlen_cp{context}"].items():
            print(f"cp={context} rank {rank} recompute={recompute} {layout}: {r}")
            assert r["same_keys"] and r["logits"] < 1e-6 and r["grads"] < 1e-6, r
            # CP=1: the whole micro-batch (BATCH x SEQ queries) in one call per block; CP=2: per
            # local query chunk (SEQ/4 queries a sample) one call, or one per sample where their
            # key ranges do not touch (test_varlen_segments_allow_what_the_document_mask_allows).
            if context == 1:
                assert r["calls_per_block"] == 1 and r["queries_per_call"] == [BATCH * SEQ], r
            else:
                assert 2 <= r["calls_per_block"] <= 2 * BATCH, r
                assert set(r["queries_per_call"]) <= {SEQ // 4, BATCH * SEQ // 4}, r


def _allowed_by_segments(layout, n_q: int, n_k: int):
    """The ``[n_q, n_k]`` (packed queries x packed keys) pattern one varlen call attends to."""
    import torch

    cu_q, cu_k, max_q, max_k, key_lo, key_hi = layout
    allowed = torch.zeros(n_q, n_k, dtype=torch.bool)
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        assert 0 < q1 - q0 <= max_q and q1 - q0 <= k1 - k0 <= max_k
        # bottom-right causal: the piece's last query sees all its keys
        allowed[q0:q1, key_lo + k0:key_lo + k1] = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(
            (k1 - k0) - (q1 - q0))
    assert key_lo + cu_k[-1] == key_hi and cu_q[-1] == n_q
    return allowed


STARTS = {"one document": [[0]], "shared": [[0, 5, 6, 20]] * 2,
          "per sample": [[0, 1, 9, 31], [0, 16], [0, 3, 4, 5, 30]], "long last": [[0, 29], [0], [0, 2]]}


@pytest.mark.parametrize("layout", list(STARTS))
def test_varlen_segments_allow_what_the_document_mask_allows(layout):
    """cu_seqlens of one call over the whole micro-batch, and per sample for every CP query chunk
    (CP=2 and 4: each local chunk over the keys up to its end), against ``DocumentMask.dense``."""
    import torch

    from longcat_megatron.model.attention import varlen_segments
    from longcat_megatron.model.document_mask import DocumentMask

    seq = 32
    documents = DocumentMask.from_starts(STARTS[layout], seq)
    b = documents.batch_size
    allowed = ~documents.dense()[:, 0]                                    # [b, s, s]
    whole = varlen_segments(documents, range(b), 0, seq, seq)
    assert whole[0] == whole[1] and whole[4:] == (0, b * seq)            # q and k segments coincide
    assert whole[2] == max(e - s for st in STARTS[layout] for s, e in zip(st, st[1:] + [seq]))
    assert torch.equal(_allowed_by_segments(whole, b * seq, b * seq), torch.block_diag(*allowed))
    for cp in (2, 4):
        c = seq // (2 * cp)
        for g in range(2 * cp):
            for i in range(b):
                one = varlen_segments(documents, range(i, i + 1), g * c, (g + 1) * c, seq)
                assert one[5] == (g + 1) * c                         # no key after the chunk is read
                assert torch.equal(_allowed_by_segments(one, c, seq), allowed[i, g * c:(g + 1) * c])
            several = varlen_segments(documents, range(b), g * c, (g + 1) * c, seq)
            # Several samples in one call only where their key ranges touch: a chunk's keys end
            # at (g+1)·c, the next sample's begin at its document's start; so only in the last
            # chunk, when each later sample's document there starts at 0.
            touching = b == 1 or (g == 2 * cp - 1 and all(
                documents.pieces(i, g * c, seq)[0][0] == 0 for i in range(1, b)))
            assert (several is not None) == touching, (g, several)


def test_varlen_dispatch_takes_the_flash_kernel_only_where_it_applies(monkeypatch):
    import torch

    from longcat_megatron.model import attention
    from longcat_megatron.model.attention import document_attention, document_attention_path, varlen_refusal

    bf16 = torch.bfloat16
    ok = dict(mode="auto", device_type="cuda", dtype=bf16, head_dim=192, dropout=0.0, backend="sdpa",
              capability=(9, 0))
    assert varlen_refusal(**ok) is None                                   # MLA on an H100 / H200
    assert varlen_refusal(**{**ok, "dtype": torch.float16, "capability": (8, 0)}) is None
    assert varlen_refusal(**{**ok, "head_dim": 256}) is None
    refused = {"device_type": "cpu", "dtype": torch.float32, "head_dim": 264, "capability": (7, 5),
               "dropout": 0.1, "backend": "eager", "mode": "pieces"}
    for field, value in refused.items():
        assert varlen_refusal(**{**ok, field: value}), field
    assert varlen_refusal(**{**ok, "head_dim": 196})                      # not a multiple of 8
    # "varlen" skips the hardware checks (CPU tests with a stand-in kernel), not the semantics
    forced = {**ok, "mode": "varlen", "device_type": "cpu", "dtype": torch.float32, "capability": None}
    assert varlen_refusal(**forced) is None
    assert varlen_refusal(**{**forced, "dropout": 0.1}) and varlen_refusal(**{**forced, "backend": "eager"})

    q = torch.zeros(4, 1, 2, 8)
    assert document_attention_path(q, 8, 0.0, "sdpa")[0] == "pieces"     # auto on CPU
    with document_attention("varlen", kernel=attention.varlen_reference):
        assert document_attention_path(q, 8, 0.0, "sdpa") == ("varlen", None)
    monkeypatch.setenv(attention.DOCUMENT_ATTENTION_ENV, "varlen")
    assert document_attention_path(q, 8, 0.0, "sdpa") == ("varlen", None)   # torch 2.13 has it
    with document_attention("pieces"):                                    # the block wins
        assert document_attention_path(q, 8, 0.0, "sdpa")[0] == "pieces"
    monkeypatch.setenv(attention.DOCUMENT_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="LONGCAT_DOCUMENT_ATTENTION='flash'"):
        document_attention_path(q, 8, 0.0, "sdpa")
