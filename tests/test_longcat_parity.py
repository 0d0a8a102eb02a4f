"""Our LongCat model == transformers' LongcatFlashForCausalLM on the same weights (fp32 logits)."""

import pytest

from tests.harness import run_distributed
from tests.longcat_tiny import YARN, tiny_config


def _parity(overrides: dict, seed: int):
    import torch
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    from longcat_megatron import runtime
    from longcat_megatron.model import hf_mapping
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(seed=seed)
    cfg = tiny_config(**overrides)
    hf_cfg = LongcatFlashConfig(**hf_mapping.hf_config_kwargs(cfg), initializer_range=0.2,
                                attn_implementation="eager")
    torch.manual_seed(seed)
    ref = LongcatFlashForCausalLM(hf_cfg).eval()
    with torch.no_grad():   # spread routing scores and bias so selection is well separated
        for layer in ref.model.layers:
            layer.mlp.router.classifier.weight.normal_(0, 1.0)
            layer.mlp.router.e_score_correction_bias.copy_(torch.randn(6) * 0.1)
            for norm in (layer.input_layernorm[0], layer.post_attention_layernorm[1]):
                norm.weight.uniform_(0.5, 1.5)
    files = hf_mapping.from_transformers_memory_layout(ref.state_dict(), cfg)
    ours = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True,
                               post_process=True).eval()
    missing, unexpected = ours.load_state_dict(hf_mapping.hf_to_megatron(files, cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    # The mapping round-trips exactly.
    back = hf_mapping.megatron_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(files) and all(torch.equal(back[k], files[k]) for k in files)

    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    pos = torch.arange(24)[None].expand(2, -1)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids, pos, None)
        ours.train()
        ours(ids, pos, None)   # training mode records the routing statistics
    picks = torch.stack([r.step_picks for _, r in ours.routers()]).sum(0)
    rel = float((got - want).abs().max() / want.abs().max())
    return rel, float(want.abs().max()), picks[: cfg.num_experts].sum().item(), picks[cfg.num_experts:].sum().item()


def _mtp_mapping():
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.model import hf_mapping
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize()
    cfg = tiny_config(mtp_num_layers=1, budget_target_ffn_experts=2.0)
    model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True)
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    hf = hf_mapping.megatron_to_hf(sd, cfg)
    back = hf_mapping.hf_to_megatron(hf, cfg)
    same = set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    return same, sorted(k for k in hf if k.startswith("model.mtp."))


@pytest.mark.parametrize("name,overrides", [("rope", {}), ("yarn", YARN)])
def test_logits_equal_transformers(name, overrides):
    rel, scale, ffn_picks, zero_picks = run_distributed(_parity, 1, overrides, 7)[0]
    print(f"{name}: max rel err {rel:.2e} (max |logit| {scale:.2f})")
    assert scale > 0.1 and ffn_picks > 0 and zero_picks > 0   # both expert kinds exercised
    assert rel < 1e-5


def test_mtp_keys_round_trip():
    same, mtp_keys = run_distributed(_mtp_mapping, 1)[0]
    assert same
    assert "model.mtp.layers.0.enorm.m.weight" in mtp_keys
    assert "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight" in mtp_keys
    assert "model.mtp.norm.weight" in mtp_keys and "model.mtp.embed_tokens.weight" in mtp_keys
    assert len(mtp_keys) == 17
