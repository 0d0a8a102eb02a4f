"""The exported HF remote code for N-gram models (ckpt_convert/hf_remote): hashing, save/load with
trust_remote_code (offline), generation, and cached decode == full-sequence recompute."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from ckpt_convert.hf_remote.modeling_longcat_ngram import ngram_ids, shift_right_within_segments


def test_ngram_ids_match_reference_vectors():
    # LongCat-Flash-Lite config (V=131072, ratio 78, N=4, K=4, EOS 2); expected ids from the
    # architecture reference (longcat_architecture.md §2.4), computed there independently.
    cfg = SimpleNamespace(emb_neighbor_num=4, emb_split_num=4, vocab_size=131072,
                          ngram_vocab_size_ratio=78, eos_token_id=2)
    ids = ngram_ids(torch.tensor([[1, 100, 2000, 30000, 2, 5, 7]]), cfg, 7)
    expected = {
        0: [1, 131172, 2885583, 6583575, 6291074, 5, 655367],
        3: [1, 131172, 2885577, 6583425, 6288770, 5, 655367],
        4: [1, 131172, 7064759, 5333150, 1730752, 5, 655367],
        7: [1, 131172, 7054673, 4324754, 2010802, 5, 655367],
        8: [1, 131172, 7051311, 2818559, 965698, 5, 655367],
        11: [1, 131172, 7041225, 9357031, 9607001, 5, 655367],
    }
    for idx, want in expected.items():
        assert ids[idx][0].tolist() == want, idx


def test_shift_stops_at_eos_but_eos_keeps_its_lookback():
    t = torch.tensor([[3, 4, 2, 5, 6]])
    assert shift_right_within_segments(t, 1, 2).tolist() == [[0, 3, 4, 0, 5]]
    assert shift_right_within_segments(t, 2, 2).tolist() == [[0, 0, 3, 0, 0]]
    assert shift_right_within_segments(t, 1, None).tolist() == [[0, 3, 4, 2, 5]]


def tiny_ngram_config():
    from ckpt_convert.hf_remote.configuration_longcat_ngram import LongcatFlashNgramConfig

    return LongcatFlashNgramConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=48,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        head_dim=4, moe_topk=2, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=16,
        max_position_embeddings=128, ngram_vocab_size_ratio=3, emb_neighbor_num=3, emb_split_num=2,
        eos_token_id=2, bos_token_id=1,
    )


@pytest.fixture(scope="module")
def saved_ngram_model(tmp_path_factory):
    from ckpt_convert.hf_remote.modeling_longcat_ngram import LongcatFlashNgramForCausalLM
    from ckpt_convert.hf_config import install_remote_code

    torch.manual_seed(0)
    model = LongcatFlashNgramForCausalLM(tiny_ngram_config()).eval()
    out = str(tmp_path_factory.mktemp("ngram") / "hf")
    model.save_pretrained(out)
    install_remote_code(out)
    return model, out


def test_remote_code_loads_offline_and_matches(saved_ngram_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, out = saved_ngram_model
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "longcat_flash_ngram"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_longcat_ngram.LongcatFlashNgramForCausalLM"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "LongcatFlashNgramForCausalLM"
    assert type(loaded).__module__ != type(model).__module__  # really the shipped copy
    x = torch.tensor([[5, 7, 9, 2, 11, 13, 2, 4, 6, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
        # The n-gram tables matter: zeroing them changes the logits.
        for t in loaded.model.ngram_embeddings.embedders:
            t.weight.zero_()
        assert (loaded(x).logits - model(x).logits).abs().max() > 1e-4


def test_generation_and_cached_decode_equal_full_recompute(saved_ngram_model):
    from transformers import AutoModelForCausalLM

    _, out = saved_ngram_model
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.tensor([[5, 7, 9, 2, 11, 13]])
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert gen.shape == (1, 26)
        full = model(gen).logits
        assert torch.equal(full[:, 5:-1].argmax(-1), gen[:, 6:])  # greedy == argmax of recompute
        # Teacher-forced decode one token at a time over a sequence with EOS inside the decoded part.
        seq = torch.tensor([[5, 7, 9, 11, 2, 13, 17, 19, 2, 2, 23, 29, 31]])
        full = model(seq).logits
        step = model(seq[:, :3], use_cache=True)
        cache, outs = step.past_key_values, [step.logits]
        assert type(cache).__name__ == "NgramCache"
        for t in range(3, seq.shape[1]):
            step = model(seq[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            outs.append(step.logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [3, 3.5])
def test_remote_ids_equal_training_side_ids(ratio):
    """The shipped HF code and the training model's N-gram ids are two implementations of one rule."""
    from longcat_megatron.model.ngram_ids import ngram_ids as training_ids

    cfg = SimpleNamespace(emb_neighbor_num=4, emb_split_num=3, vocab_size=50,
                          ngram_vocab_size_ratio=ratio, eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 40), generator=g)
    tokens[tokens % 7 == 0] = 2  # plenty of EOS, also back to back
    ours = torch.stack(ngram_ids(tokens, cfg, 40))
    theirs = training_ids(tokens, vocab_size=50, ratio=ratio, max_n=4, splits=3, eos_token_id=2)
    assert torch.equal(ours, theirs)
    # Cached decode: N-1 = 3 tokens of context before the 3 new ones give the full-sequence ids.
    step = torch.stack(ngram_ids(tokens[:, 34:], cfg, 3))
    assert torch.equal(step, theirs[..., 37:])
