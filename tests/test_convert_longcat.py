"""megatron <-> HF conversion of LongCat checkpoints end to end.

* A tiny LongCat (zero experts, MTP, budget controller) trained 3 steps by the training loop at
  TP=2 (SP) on 2 gloo ranks (checkpoint with optimizer state) is exported
  with ``to_hf``; transformers' ``LongcatFlashForCausalLM`` gives our model's logits (fp32, 1e-5
  relative) and the same 20 greedy tokens.
* HF -> megatron at other layouts (EP=2, PP=2, TP=2 x EP=2) reproduces every saved tensor bitwise.
* A tiny random ``LongcatFlashForCausalLM`` saved by transformers itself imports and gives its logits.
* Bad input: a clear error and no output directory.
"""

import json
import os
import shutil

import pytest
import torch

from ckpt_convert import ConversionError
from tests.harness import run_distributed

TINY = dict(arch="longcat", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
            vocab_size=1024, num_experts=4, zero_expert_num=2, moe_router_topk=2,
            moe_ffn_hidden_size=16, routed_scaling_factor=2.0, mtp_num_layers=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            max_position_embeddings=128, budget_target_ffn_experts=1.5, budget_rate=0.01)
# from_hf needs the training-only fields again (HF configs do not carry them).
TRAINING_ONLY = ["budget_target_ffn_experts=1.5", "budget_rate=0.01"]


def _train_longcat(root: str) -> dict:
    """3 training steps of TINY at TP=2 with sequence parallelism; saves at step 3."""
    from tests.train_utils import run_training

    overrides = [f"model.{k}={v}" for k, v in TINY.items()] + [
        "parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_length=16",
        "train.train_iters=3", "train.global_batch_size=4", "train.micro_batch_size=2",
        f"checkpoint.save={root}", "checkpoint.save_interval=3", "logging.progress=false"]
    return run_training(overrides)["losses"]


def _export(load: str, out: str, max_shard_size: str = "5GB"):
    from ckpt_convert.to_hf import convert

    return convert(load, out, progress=False, max_shard_size=max_shard_size)


def _verify(load: str, hf_dir: str):
    from ckpt_convert.verify import verify_export

    return verify_export(load, hf_dir).__dict__


def _verify_and_greedy(load: str, hf_dir: str, steps: int = 20):
    """verify_export's report, then 20 greedy tokens from our model (full recompute) and from
    transformers' generate."""
    from transformers import AutoModelForCausalLM

    from ckpt_convert.verify import load_megatron_model, verify_export

    report = verify_export(load, hf_dir).__dict__
    model, _ = load_megatron_model(load)
    ids = torch.tensor([[5, 9, 17, 33, 65]])
    ours = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ours, None, None)[:, -1].argmax(-1, keepdim=True)
            ours = torch.cat([ours, nxt], 1)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
        theirs = hf.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    return report, ours.tolist(), theirs.tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("longcat")
    ckpt = str(base / "ckpt_tp2")
    run_distributed(_train_longcat, 2, ckpt)
    hf_dir = str(base / "hf")
    summary = run_distributed(_export, 1, ckpt, hf_dir, "40KB")[0]
    return base, ckpt, hf_dir, summary


def _model_tensors(root: str) -> dict:
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir

    r = TorchDistReader(resolve_checkpoint_dir(root)[0])
    return {k: r.read(k) for k in r.model_keys() if ".router.controller." not in k}


def test_export_layout(exported):
    _, _, hf_dir, summary = exported
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["model_type"] == "longcat_flash" and cfg["architectures"] == ["LongcatFlashForCausalLM"]
    assert cfg["n_routed_experts"] == 4 and cfg["zero_expert_num"] == 2 and cfg["num_layers"] == 2
    assert cfg["head_dim"] == cfg["qk_rope_head_dim"] == 4
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) == summary["files"] > 1
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "model.layers.1.mlp.experts.4.gate_proj.weight" in keys  # transformers 5.x zero-expert quirk
    assert "model.layers.1.mlp.experts.4.down_proj.weight" not in keys
    assert {"model.mtp.layers.0.enorm.m.weight", "model.mtp.norm.weight",
            "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight"} <= keys
    assert os.path.isfile(os.path.join(hf_dir, "generation_config.json"))
    assert not [n for n in os.listdir(os.path.dirname(hf_dir)) if n.startswith(".hf.partial")]


def test_router_is_planned_in_fp32_for_any_dtype(exported):
    """HF keeps the router in fp32: --dtype bf16 casts everything else, not the classifier/bias."""
    from ckpt_convert.dcp_reader import TorchDistReader, resolve_checkpoint_dir
    from ckpt_convert.layout import CheckpointLocator
    from ckpt_convert.to_hf import load_model_config, plan_export

    iter_dir = resolve_checkpoint_dir(exported[1])[0]
    items = plan_export(CheckpointLocator(TorchDistReader(iter_dir)), load_model_config(iter_dir),
                        dtype=torch.bfloat16, zero_expert_weights=True)
    dtypes = {i.spec.name: i.spec.dtype for i in items}
    router = [k for k in dtypes if ".mlp.router." in k]
    assert len(router) == 4 and all(dtypes[k] == torch.float32 for k in router)
    assert dtypes["model.layers.0.mlp.router.classifier.weight"] == torch.float32
    assert dtypes["lm_head.weight"] == torch.bfloat16
    item = next(i for i in items if i.spec.name == "model.layers.1.mlp.router.classifier.weight")
    assert item.produce().dtype == torch.float32


def test_export_logits_and_greedy_match_transformers(exported):
    _, ckpt, hf_dir, _ = exported
    report, ours, theirs = run_distributed(_verify_and_greedy, 1, ckpt, hf_dir)[0]
    assert report["max_rel"] < 1e-5, report
    assert report["top1_agreement"] == 1.0
    assert len(ours[0]) == 25 and ours == theirs


def _load_both_and_compare(original: str, imported: str, tp: int, pp: int, ep: int) -> int:
    """Load both checkpoints with the training loop's loader at (tp, pp, ep); every local tensor of
    this rank must be bitwise equal. Returns the number compared."""
    from megatron.core import parallel_state as ps

    from ckpt_convert.dcp_reader import resolve_checkpoint_dir
    from ckpt_convert.to_hf import load_model_config
    from longcat_megatron import runtime
    from longcat_megatron.model.factory import build_model_chunk, transformer_config
    from longcat_megatron.training.checkpointing import load_checkpoint

    cfg = load_model_config(resolve_checkpoint_dir(imported)[0])
    runtime.initialize(tensor=tp, pipeline=pp, expert=ep, num_experts=cfg.num_experts, seed=99)
    tfc = transformer_config(cfg, tensor=tp, pipeline=pp, expert=ep, sequence_parallel=tp > 1)
    states = []
    for root in (original, imported):
        model = build_model_chunk(cfg, tfc, pre_process=ps.is_pipeline_first_stage(),
                                  post_process=ps.is_pipeline_last_stage())
        result, _ = load_checkpoint(root, [model], None, None, load_rng=False)
        assert result.iteration is not None and result.path is not None  # a committed checkpoint loaded
        states.append({k: v for k, v in model.state_dict().items()
                       if torch.is_tensor(v) and "_extra_state" not in k and ".controller." not in k})
    assert set(states[0]) == set(states[1])
    for key, tensor in states[0].items():
        assert torch.equal(tensor, states[1][key]), key
    return len(states[0])


@pytest.fixture(scope="module")
def imported(exported):
    from ckpt_convert.from_hf import convert

    base, _, hf_dir, _ = exported
    back = str(base / "back")
    convert(hf_dir, back, model_overrides=TRAINING_ONLY, progress=False)
    return back


def test_roundtrip_megatron_hf_megatron_is_bitwise(exported, imported):
    _, ckpt, _, _ = exported
    original, again = _model_tensors(ckpt), _model_tensors(imported)
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert torch.equal(tensor, again[key]), key
    run_cfg = open(os.path.join(imported, "iter_0000000", "run_config.yaml")).read()
    assert "num_experts: 4" in run_cfg


def test_imported_checkpoint_has_checksums_that_training_verifies(imported, tmp_path):
    """from_hf digests every file while writing (checksums.json); a flipped byte is named."""
    import json
    import shutil

    from longcat_megatron.training.checkpoint_integrity import MANIFEST, verify_checkpoint

    it = os.path.join(imported, "iter_0000000")
    manifest = json.load(open(os.path.join(it, MANIFEST)))
    names = set(manifest["files"])
    assert {"run_config.yaml", ".metadata", "common.pt"} <= names
    assert {n for n in os.listdir(it) if n.endswith(".distcp")} <= names
    assert not any(n.endswith(".digest") for n in os.listdir(it))
    assert verify_checkpoint(it) == []
    copy = str(tmp_path / "iter")
    shutil.copytree(it, copy)
    shard = sorted(n for n in os.listdir(copy) if n.endswith(".distcp"))[0]
    with open(os.path.join(copy, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(copy, shard)) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert verify_checkpoint(copy) == [f"{os.path.join(copy, shard)}: content does not match its SHA-256 digest"]


@pytest.mark.parametrize("tp,pp,ep", [(1, 2, 1), (2, 1, 2)])  # saved at TP=2; EP is in (2,1,2)
def test_imported_checkpoint_loads_under_other_layouts(exported, imported, tp, pp, ep):
    _, ckpt, _, _ = exported
    counts = run_distributed(_load_both_and_compare, tp * pp * ep, ckpt, imported, tp, pp, ep)
    assert min(counts) > 10


def test_import_via_model_matches_streaming_import(exported, imported):
    from ckpt_convert.from_hf import convert

    base, _, hf_dir, _ = exported
    via = str(base / "via_model")
    convert(hf_dir, via, tp=2, via_model=True, model_overrides=TRAINING_ONLY, progress=False)
    streamed, built = _model_tensors(imported), _model_tensors(via)
    assert set(streamed) == set(built)
    for key, tensor in streamed.items():
        assert torch.equal(tensor, built[key]), key


def _save_transformers_model(tmp: str):
    """A tiny random LongcatFlashForCausalLM saved by transformers itself -> our checkpoint."""
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg = LongcatFlashConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4,
                             ffn_hidden_size=48, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                             qk_rope_head_dim=4, v_head_dim=8, head_dim=4, moe_topk=2,
                             n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=16,
                             max_position_embeddings=128, routed_scaling_factor=3.0)
    torch.manual_seed(3)
    model = LongcatFlashForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 6))
            for norm in (layer.input_layernorm[0], layer.self_attn[1].kv_a_layernorm):
                norm.weight.normal_(1.0, 0.1)
    model.save_pretrained(os.path.join(tmp, "tf"))
    return True


def test_transformers_saved_model_imports_with_same_logits(tmp_path):
    from ckpt_convert.from_hf import convert

    _save_transformers_model(str(tmp_path))  # transformers only: safe in the test process
    hf_dir, ckpt = str(tmp_path / "tf"), str(tmp_path / "ckpt")
    convert(hf_dir, ckpt, progress=False)
    report = run_distributed(_verify, 1, ckpt, hf_dir)[0]
    assert report["max_rel"] < 1e-5 and report["top1_agreement"] == 1.0, report


# ------------------------------------------------------------------------------------ bad input
def test_to_hf_bad_inputs_leave_no_output(exported, tmp_path):
    from ckpt_convert.to_hf import main

    _, ckpt, _, _ = exported
    out = tmp_path / "out"
    assert main(["--load", ckpt, "--iteration", "99", "--output", str(out), "--no-progress"]) == 2
    assert not out.exists()
    # A tensor the run config does not describe -> unknown key, nothing written.
    odd = tmp_path / "odd"
    shutil.copytree(ckpt, odd)
    cfg_path = odd / "iter_0000003" / "run_config.yaml"
    text = cfg_path.read_text().replace("mtp_num_layers: 1", "mtp_num_layers: 0")
    cfg_path.write_text(text)
    with pytest.raises(ConversionError, match=r"does not know, e\.g\. 'mtp"):
        _export(str(odd), str(out))
    assert not out.exists() and os.listdir(tmp_path) == ["odd"]
    # Config says more experts than saved.
    cfg_path.write_text(text.replace("mtp_num_layers: 0", "mtp_num_layers: 1")
                        .replace("num_experts: 4", "num_experts: 8"))
    with pytest.raises(ConversionError, match="local_experts.4"):
        _export(str(odd), str(out))
    assert not out.exists()


def test_from_hf_bad_inputs_leave_no_output(exported, tmp_path):
    from ckpt_convert.from_hf import convert

    _, _, hf_dir, _ = exported
    with pytest.raises(ConversionError, match=r"model.hidden_size: it is fixed by .*config.json \(32\)"):
        convert(hf_dir, str(tmp_path / "x"), model_overrides=["hidden_size=64"])
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    cfg = json.load(open(bad / "config.json"))
    json.dump(dict(cfg, n_routed_experts=3, moe_topk=2), open(bad / "config.json", "w"))
    save = tmp_path / "save"
    with pytest.raises(ConversionError, match=r"n_routed_experts=3 but 'model.layers.0.mlp.experts' "
                                              r"holds FFN weights \(down_proj\) for 4 experts"):
        convert(str(bad), str(save))
    assert not save.exists()
    json.dump(cfg, open(bad / "config.json", "w"))
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.surprise.weight": torch.zeros(2)}, str(bad / "extra.safetensors"))
    index = json.load(open(bad / "model.safetensors.index.json"))
    index["weight_map"]["model.layers.0.mlp.surprise.weight"] = "extra.safetensors"
    json.dump(index, open(bad / "model.safetensors.index.json", "w"))
    with pytest.raises(ConversionError, match=r"does not know, e\.g\. 'model.layers.0.mlp.surprise.weight' "
                                              r"\(in extra.safetensors\)"):
        convert(str(bad), str(save))
    assert not save.exists() and os.listdir(tmp_path) == ["hf"]


# ------------------------------------------------------------------------------------- N-gram
def _has_ngram_model() -> bool:
    from longcat_megatron.model.config import ModelConfig

    return hasattr(ModelConfig(), "ngram")


def _save_ngram_longcat(root: str, tp: int):
    from megatron.core import parallel_state as ps

    from longcat_megatron import runtime
    from longcat_megatron.config import ParallelConfig, RunConfig, save_config
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.factory import build_model_chunk, transformer_config
    from longcat_megatron.model.ngram_config import NgramConfig
    from longcat_megatron.training.checkpointing import TrainState, save_checkpoint

    cfg = ModelConfig(**dict(TINY, mtp_num_layers=0))
    cfg.ngram = NgramConfig(ngram_vocab_size_ratio=3.5, emb_neighbor_num=3, emb_split_num=2, eos_token_id=2)
    runtime.initialize(tensor=tp, num_experts=cfg.num_experts, seed=11)
    tfc = transformer_config(cfg, tensor=tp, sequence_parallel=tp > 1)
    model = build_model_chunk(cfg, tfc, pre_process=True, post_process=True)
    run_cfg = RunConfig(model=cfg, parallel=ParallelConfig(tensor=tp, sequence_parallel=tp > 1))
    save_checkpoint(root, [model], None, None, TrainState(iteration=2),
                    config_yaml_writer=lambda p: save_config(run_cfg, p))
    return True


@pytest.mark.skipif(not _has_ngram_model(), reason="ModelConfig has no 'ngram' section yet")
def test_ngram_export_logits_and_roundtrip(tmp_path):
    from ckpt_convert.from_hf import convert

    ckpt, hf_dir, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    run_distributed(_save_ngram_longcat, 2, ckpt, 2)
    run_distributed(_export, 1, ckpt, hf_dir, "5GB")
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["model_type"] == "longcat_flash_ngram" and cfg["emb_neighbor_num"] == 3
    assert os.path.isfile(os.path.join(hf_dir, "modeling_longcat_ngram.py"))
    report, ours, theirs = run_distributed(_verify_and_greedy, 1, ckpt, hf_dir)[0]
    assert report["max_rel"] < 1e-5 and report["top1_agreement"] == 1.0, report
    assert ours == theirs
    convert(hf_dir, back, ep=2, progress=False)
    original, again = _model_tensors(ckpt), _model_tensors(back)
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert torch.equal(tensor, again[key]), key
    # The streamed N-gram tables (chunked per sub-table) load row-sharded at another layout.
    assert min(run_distributed(_load_both_and_compare, 2, ckpt, back, 1, 1, 2)) > 10


NGRAM = ["model.ngram.ngram_vocab_size_ratio=3.3", "model.ngram.emb_neighbor_num=3",
         "model.ngram.emb_split_num=2", "model.ngram.eos_token_id=2"]


def _train_longcat_at(root: str, tp: int, pp: int, ep: int, ngram: bool) -> dict:
    """2 training steps of TINY (with MTP; optionally the N-gram Embedding) at TPxPPxEP; saves."""
    from tests.train_utils import run_training

    overrides = [f"model.{k}={v}" for k, v in TINY.items()] + (NGRAM if ngram else []) + [
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.expert={ep}",
        f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}", "data.seq_length=16",
        "train.train_iters=2", "train.global_batch_size=4", "train.micro_batch_size=1",
        f"checkpoint.save={root}", "logging.progress=false"]
    return run_training(overrides)["losses"]


@pytest.mark.parametrize("tp,pp,ep,world,ngram",
                         [(1, 1, 2, 2, False), (1, 2, 1, 2, True), (2, 1, 2, 4, True)],
                         ids=["ep2", "pp2-ngram", "tp2xep2-ngram"])
def test_roundtrip_is_bitwise_from_any_saved_layout(tmp_path, tp, pp, ep, world, ngram):
    """Checkpoints saved at EP=2, PP=2 and TP=2 x EP=2 (with MTP, with and without the N-gram
    Embedding) go megatron -> HF -> megatron with every model tensor bitwise equal (the TP=2 case
    is test_roundtrip_megatron_hf_megatron_is_bitwise)."""
    from ckpt_convert.from_hf import convert

    ckpt, hf_dir, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    run_distributed(_train_longcat_at, world, ckpt, tp, pp, ep, ngram)
    run_distributed(_export, 1, ckpt, hf_dir, "5GB")
    if ngram:   # Lite's released layout: MTP tensors in model-auxiliary.safetensors, outside the index
        from safetensors import safe_open

        with safe_open(os.path.join(hf_dir, "model-auxiliary.safetensors"), "pt") as f:
            aux = set(f.keys())
        index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"]
        assert aux and all(k.startswith("model.mtp.") for k in aux)
        assert "model.mtp.layers.0.eh_proj.weight" in aux
        assert not [k for k in index if k.startswith("model.mtp.")]
    convert(hf_dir, back, tp=tp, pp=pp, ep=ep, model_overrides=TRAINING_ONLY, progress=False)
    original, again = _model_tensors(ckpt), _model_tensors(back)
    assert set(original) == set(again) and len(original) > 10
    for key, tensor in original.items():
        assert torch.equal(tensor, again[key]), key


def _verify_slice(load: str, hf_dir: str, layers: int):
    from ckpt_convert.verify import verify_export

    return verify_export(load, hf_dir, layers=layers).__dict__


def _perturb(hf_dir: str, key: str) -> None:
    """Add 0.5 to one tensor of an exported HF directory (in place)."""
    from safetensors.torch import load_file, save_file

    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    path = os.path.join(hf_dir, index["weight_map"][key])
    tensors = load_file(path)
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_slice_checks_only_the_first_layers(exported, tmp_path):
    """--verify-layers 1 compares embedding + layer 0 + head: it passes on a good export, catches a
    wrong layer-0 tensor, and (being a slice) does not look at layer 1."""
    _, ckpt, hf_dir, _ = exported
    ok = run_distributed(_verify_slice, 1, ckpt, hf_dir, 1)[0]
    assert ok["max_rel"] < 1e-5 and ok["top1_agreement"] == 1.0, ok
    bad0, bad1 = str(tmp_path / "bad0"), str(tmp_path / "bad1")
    shutil.copytree(hf_dir, bad0)
    shutil.copytree(hf_dir, bad1)
    _perturb(bad0, "model.layers.0.mlps.0.up_proj.weight")
    _perturb(bad1, "model.layers.1.mlps.0.up_proj.weight")
    assert run_distributed(_verify_slice, 1, ckpt, bad0, 1)[0]["max_rel"] > 1e-3
    assert run_distributed(_verify_slice, 1, ckpt, bad1, 1)[0]["max_rel"] < 1e-5
    assert run_distributed(_verify_slice, 1, ckpt, bad1, 2)[0]["max_rel"] > 1e-3
