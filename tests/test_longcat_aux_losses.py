"""Auxiliary-loss formulas against direct per-token computations (reference §3.3, §3.7)."""

import math

import torch

from longcat_megatron.model.aux_losses import device_load_balance_loss, hidden_z_loss


def test_hidden_z_loss_formula():
    h = torch.randn(5, 3, 7)
    mask = torch.ones(5, 3)
    mask[3:, 1] = 0.0                      # SFT-style padding at the end of sequence 1
    want, count = 0.0, 0
    for t, m in zip(h.reshape(-1, 7), mask.reshape(-1)):
        if m:
            want += math.log(sum(math.exp(abs(float(v))) for v in t)) ** 2
            count += 1
    z_sum, tokens = hidden_z_loss(h, 1e-3, mask)
    assert int(tokens) == count == 13
    assert math.isclose(float(z_sum), 1e-3 * want, rel_tol=1e-5)
    # Padding values do not matter.
    h2 = h.clone()
    h2[3:, 1] = 100.0
    assert torch.equal(hidden_z_loss(h2, 1e-3, mask)[0], z_sum)


def test_device_load_balance_loss_formula():
    g = torch.Generator().manual_seed(0)
    n, z, k, groups, k_e = 6, 3, 4, 3, 2.0
    scores = torch.softmax(torch.randn(10, n + z, generator=g), dim=-1)
    picked = torch.topk(scores, k, dim=-1)[1]
    sel = torch.zeros_like(scores).scatter(1, picked, 1.0)
    picks = sel.sum(0)
    t = 10.0
    want = 0.0
    size = n // groups
    for j in range(groups):
        members = range(j * size, (j + 1) * size)
        f = groups / (k_e * t) * sum(float(sel[:, i].sum()) for i in members)
        p = sum(float(scores[:, i].sum()) for i in members) / t
        want += f * p
    f_zero = float(sel[:, n:].sum()) / ((k - k_e) * t)
    p_zero = float(scores[:, n:].sum()) / t
    want = 0.01 * (want + f_zero * p_zero)
    got = device_load_balance_loss(scores, picks, num_ffn=n, groups=groups, topk=k, target=k_e,
                                   global_tokens=t, coeff=0.01)
    assert math.isclose(float(got), want, rel_tol=1e-6)
    # Gradient flows to the scores only (the pick counts are constants).
    s = scores.clone().requires_grad_(True)
    device_load_balance_loss(s, picks, num_ffn=n, groups=groups, topk=k, target=k_e,
                             global_tokens=t, coeff=0.01).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def _z_loss_with_padding():
    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk
    from tests.longcat_tiny import tiny_config

    runtime.initialize()
    cfg = tiny_config(z_loss_coeff=1e-3)
    tf = transformer_config(cfg)
    tf.calculate_per_token_loss = True
    model = build_longcat_chunk(cfg, tf, pre_process=True, post_process=True).train()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, cfg.vocab_size, (10,), generator=g), torch.randint(1, cfg.vocab_size, (16,), generator=g)

    def z_metric(ids, mask):
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        model(ids, pos, None, labels=ids, loss_mask=mask)
        return float(model._last_aux["z_loss"])

    # SFT batch: sequence a padded from 10 to 16 tokens (pad id 0, loss_mask 0 there).
    ids = torch.stack([torch.cat([a, torch.zeros(6, dtype=torch.long)]), b])
    mask = torch.ones(2, 16)
    mask[0, 10:] = 0.0
    padded = z_metric(ids, mask)
    # The same tokens without padding (causal: the real tokens' hidden states do not change).
    alone_a = z_metric(a[None], torch.ones(1, 10))
    alone_b = z_metric(b[None], torch.ones(1, 16))
    return padded, (10 * alone_a + 16 * alone_b) / 26


def test_z_loss_ignores_sft_padding():
    """The z-loss is the mean over loss-masked tokens: padding neither adds nor dilutes."""
    from tests.harness import run_distributed

    padded, unpadded = run_distributed(_z_loss_with_padding, 1)[0]
    assert math.isclose(padded, unpadded, rel_tol=1e-5), (padded, unpadded)
