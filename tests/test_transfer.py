"""Hyperparameter transfer by width scaling: the proxy CLI, the ``transfer`` section, and the
coordinate check (the standard test of μP-style transfer) on the LongCat model.

Coordinate check: LongCat models of width 32, 64, 128, 256 (2 shortcut layers, MLA with the q/kv
scale correction, 4 FFN + 2 zero experts, heads and MLA ranks and FFN widths proportional to the
width, head widths fixed, as ``longcat_megatron.proxy`` narrows a model) train 5 Adam steps at the
same LR on the same batch; then the RMS of each shortcut layer's output and of the logits is taken.
With ``transfer.base_hidden_size=32`` every RMS stays within a factor :data:`BAND` across the
widths; with transfer off it grows with the width (at least :data:`DRIFT` x from w to 8w).
"""

from __future__ import annotations

import math
import os

import pytest
import yaml

from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLASH = os.path.join(ROOT, "configs", "longcat_flash.yaml")
LITE = os.path.join(ROOT, "configs", "longcat_flash_lite.yaml")

WIDTHS = (32, 64, 128, 256)
STEPS, LR, BASE_STD = 5, 1e-2, 0.02
BAND = 2.0    # transfer on: max / min RMS over the widths, per layer output
DRIFT = 4.0   # transfer off: RMS(8w) / RMS(w) at least this (measured here: 7-21)


# ------------------------------------------------------------------------------------ proxy
def test_proxy_of_flash_divides_widths_and_keeps_the_rest():
    from longcat_megatron.config import load_config
    from longcat_megatron.proxy import make_proxy

    cfg = load_config(FLASH, check=False)
    proxy, scaled = make_proxy(cfg, 8)
    m = proxy.model
    # The LongCat-Flash report's proxy: 768 wide (s = 8); heads / 8 with head widths kept.
    assert (m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.moe_ffn_hidden_size) == \
        (768, 8, 1536, 256)
    assert (m.q_lora_rank, m.kv_lora_rank) == (192, 64)
    assert (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (128, 64, 128)
    # MLA scale correction sqrt(H / rank) unchanged.
    assert m.hidden_size / m.q_lora_rank == cfg.model.hidden_size / cfg.model.q_lora_rank
    for kept in ("num_layers", "num_experts", "zero_expert_num", "moe_router_topk", "vocab_size",
                 "init_method_std"):
        assert getattr(m, kept) == getattr(cfg.model, kept), kept
    assert proxy.optimizer == cfg.optimizer and proxy.parallel == cfg.parallel
    assert proxy.transfer.base_hidden_size == 768
    assert scaled["hidden_size"] == (6144, 768) and "num_experts" not in scaled


def test_proxy_refuses_shapes_that_do_not_divide():
    from longcat_megatron.config import load_config
    from longcat_megatron.proxy import ProxyError, make_proxy

    cfg = load_config(FLASH, check=False)
    with pytest.raises(ProxyError, match=r"model.hidden_size=6144 is not divisible by --width-scale 5"):
        make_proxy(cfg, 5)
    with pytest.raises(ProxyError, match=r"qk_rope_head_dim=64 / 64 is odd"):
        make_proxy(cfg, 64, attention="head-dim")
    make_proxy(load_config(LITE, check=False), 16)     # 12 N-gram tables of width 3072 / 16 / 12
    from longcat_megatron.config import RunConfig
    from longcat_megatron.model.ngram_config import NgramConfig
    from tests.longcat_tiny import tiny_config

    # 32 N-gram tables: 96 wide is fine, the 48-wide proxy is not (the N-gram layout is kept).
    wide = tiny_config(hidden_size=96, num_attention_heads=2, ngram=NgramConfig(
        ngram_vocab_size_ratio=4.5, emb_neighbor_num=5, emb_split_num=8, eos_token_id=2))
    with pytest.raises(ProxyError, match="not divisible by the 32 N-gram sub-tables"):
        make_proxy(RunConfig(model=wide), 2)


def test_proxy_cli_writes_a_loadable_labelled_config(tmp_path, capsys):
    from longcat_megatron.config import load_config
    from longcat_megatron.proxy import main

    out = tmp_path / "proxy.yaml"
    assert main(["--config", LITE, "--width-scale", "4", "--out", str(out), "parallel.tensor=4"]) == 0
    printed = capsys.readouterr().out
    assert "hidden_size 3072 -> 768" in printed and "transfer.base_hidden_size=768" in printed
    assert "ngram layout (N=4, K=4" in printed and "num_experts=256" in printed
    text = out.read_text()
    assert "hidden_size: 768  # proxy: 3072 / 4" in text
    assert "yarn_original_max_position_embeddings: 32768  # guess:" in text
    proxy = load_config(str(out), ["data.mock=true"])
    assert proxy.model.hidden_size == 768 and proxy.model.ngram.emb_split_num == 4
    assert proxy.transfer.base_hidden_size == 768
    # A layout the proxy cannot take is refused with the fix named (exit 2, no file written).
    bad = tmp_path / "bad.yaml"
    assert main(["--config", LITE, "--width-scale", "8", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "parallel.tensor=8 does not divide model.num_attention_heads=4" in err
    assert "overrides" in err and not bad.exists()


# -------------------------------------------------------------------------------- transfer
def test_transfer_section_checks_and_dry_run(capsys):
    from longcat_megatron.config import load_config
    from longcat_megatron.errors import UserInputError as ConfigError
    from longcat_megatron.train import main as train_main

    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    with pytest.raises(ConfigError, match="untie_embeddings_and_output_weights=true"):
        load_config(tiny, ["transfer.base_hidden_size=32", "model.untie_embeddings_and_output_weights=false"])
    with pytest.raises(ConfigError, match=r"transfer.width_scale=4.0 but .* = 64 / 32 = 2"):
        load_config(tiny, ["transfer.base_hidden_size=32", "transfer.width_scale=4"])
    with pytest.raises(ConfigError, match="without transfer.base_hidden_size"):
        load_config(tiny, ["transfer.width_scale=2"])
    assert train_main(["--config", FLASH, "--dry-run", "--world-size", "1024", "--force",
                       "data.mock=true", "transfer.base_hidden_size=768"]) == 0
    out = capsys.readouterr().out
    assert "transfer: width scale s = 6144 / 768 = 8" in out
    assert "hidden      init std 0.002121   lr 3.75e-05 (min 3.75e-06)" in out
    assert "embedding   init std 0.006      lr 0.0003 (min 3e-05)" in out
    assert "unembedding init std 0.002121   lr 3.75e-05" in out
    assert "transfer.base_hidden_size=768" in out.splitlines()[-1]   # among the command-line values
    assert train_main(["--config", tiny, "--dry-run"]) == 0
    assert "transfer: off" in capsys.readouterr().out


# ----------------------------------------------------------------------- coordinate check
def run_config(width: int, transfer: bool, ngram: bool = False, distributed_optimizer: bool = True):
    """The coordinate check's LongCat run config at ``width`` (base width 32 when ``transfer``)."""
    from longcat_megatron.config import OptimizerConfig, ParallelConfig, RunConfig, ScheduleConfig, TrainConfig
    from longcat_megatron.data.config import DataConfig
    from longcat_megatron.model.config import ModelConfig
    from longcat_megatron.model.ngram_config import NgramConfig
    from longcat_megatron.transfer import TransferConfig

    m = ModelConfig(
        arch="longcat", num_layers=2, hidden_size=width, num_attention_heads=width // 16,
        ffn_hidden_size=2 * width, vocab_size=256, max_position_embeddings=64, num_experts=4,
        zero_expert_num=2, moe_router_topk=3, moe_ffn_hidden_size=width // 2,
        q_lora_rank=width // 2, kv_lora_rank=width // 4, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, init_method_std=BASE_STD, mtp_num_layers=1 if ngram else 0,
        ngram=NgramConfig(ngram_vocab_size_ratio=4.5, emb_neighbor_num=3, emb_split_num=2,
                          silence=["ngram_params_over_half"]) if ngram else None)
    return RunConfig(
        model=m, parallel=ParallelConfig(backend="gloo", distributed_optimizer=distributed_optimizer),
        data=DataConfig(mock=True, seq_length=32, eod_token_id=2),
        train=TrainConfig(micro_batch_size=4, global_batch_size=4, train_iters=STEPS),
        optimizer=OptimizerConfig(lr=LR, min_lr=LR / 10, weight_decay=0.0, clip_grad=0.0),
        schedule=ScheduleConfig(style="constant", warmup_iters=0),
        transfer=TransferConfig(base_hidden_size=32 if transfer else None))


def _trainer(cfg, layout):
    """(model chunks, optimizer, scheduler, step(batch, forward_only)) as the training loop wires them."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from longcat_megatron.training.loop import forward_step
    from longcat_megatron.training.setup import build_model, build_optimizer, build_scheduler

    model = build_model(cfg, layout)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    tf = model[0].config
    tf.finalize_model_grads_func, tf.grad_scale_func = finalize_model_grads, opt.scale_loss
    tf.no_sync_func = model[0].no_sync
    fb = get_forward_backward_func()

    def step(batch, forward_only=False):
        model[0].zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=model[0],
           num_microbatches=1, seq_length=32, micro_batch_size=4, forward_only=forward_only)
        if not forward_only:
            opt.step()
            sched.step(increment=1)
    return model, opt, sched, step


def _groups_and_inits(layout) -> dict:
    """Per class: the LR of its optimizer group(s) and the std its matrices were drawn with
    (width 128, s = 4, N-gram Embedding and MTP on; the plain optimizer, whose groups hold the
    model's parameters themselves: the coordinate check runs the distributed one)."""
    from longcat_megatron.training.setup import unwrap
    from longcat_megatron.transfer import param_class

    model, opt, _, _ = _trainer(run_config(128, transfer=True, ngram=True, distributed_optimizer=False), layout)
    named = {id(p): n for n, p in unwrap(model[0]).named_parameters()}
    lrs, wd, stds = {}, {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            cls = param_class(p, named[id(p)])
            lrs.setdefault(cls, set()).add(group["lr"])
            wd.setdefault(cls, set()).add(group["wd_mult"])
    for n, p in unwrap(model[0]).named_parameters():
        if p.dim() >= 2:
            stds.setdefault(param_class(p, n), {})[n] = float(p.detach().float().std())
    return {"lrs": lrs, "wd": wd, "stds": stds}


def _coordinate_job() -> dict:
    import torch

    from longcat_megatron import runtime
    from longcat_megatron.training.setup import unwrap

    layout = runtime.initialize(num_experts=4, seed=1, backend="gloo")
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(4, 32),
                 position_ids=torch.arange(32)[None].expand(4, -1), attention_mask=None)
    rms = {}
    for transfer in (True, False):
        for width in WIDTHS:
            torch.manual_seed(1)
            model, _, _, step = _trainer(run_config(width, transfer), layout)
            inner, seen = unwrap(model[0]), {}
            watched = {f"layer {k}": layer for k, layer in inner.decoder.layers.items()}
            watched["logits"] = inner.output_layer
            for name, module in watched.items():
                module.register_forward_hook(
                    lambda mod, inp, out, name=name: seen.__setitem__(
                        name, float((out[0] if isinstance(out, tuple) else out).float().pow(2).mean().sqrt())))
            for _ in range(STEPS):
                step(batch)
            step(batch, forward_only=True)      # the RMS after STEPS updates
            rms[(transfer, width)] = seen
    return {"rms": rms, "groups": _groups_and_inits(layout)}


@pytest.fixture(scope="module")
def coordinate_check():
    return run_distributed(_coordinate_job, 1, timeout=240)[0]


def test_coordinate_check_rms_stays_in_band_with_transfer_and_drifts_without(coordinate_check):
    rms = coordinate_check["rms"]
    names = sorted(rms[(True, WIDTHS[0])])
    assert names == ["layer 0", "layer 1", "logits"]
    table = "\n".join(f"{n}: on {[round(rms[(True, w)][n], 3) for w in WIDTHS]} "
                      f"off {[round(rms[(False, w)][n], 3) for w in WIDTHS]}" for n in names)
    for n in names:
        on = [rms[(True, w)][n] for w in WIDTHS]
        off = [rms[(False, w)][n] for w in WIDTHS]
        assert all(math.isfinite(v) and v > 0 for v in on + off), table
        assert max(on) / min(on) <= BAND, f"transfer on, {n} leaves the x{BAND} band\n{table}"
        assert off[-1] / off[0] >= DRIFT, f"transfer off, {n} does not drift with width\n{table}"
        assert off[-1] / off[0] > off[-2] / off[0], f"transfer off, {n}: drift not growing\n{table}"
        # The base width is the same model either way.
        assert on[0] == pytest.approx(off[0], rel=1e-6)


def test_param_groups_and_init_follow_the_rule_table(coordinate_check):
    g = coordinate_check["groups"]
    s = 128 / 32
    # megatron param groups: hidden matrices and the unembedding at LR / s, embeddings (token,
    # N-gram tables, MTP) and 1-D parameters at LR; 1-D parameters keep megatron's wd_mult 0.
    expected = {"hidden": LR / s, "unembedding": LR / s, "embedding": LR, "vector": LR}
    for cls, lr in expected.items():
        assert sorted(g["lrs"][cls]) == pytest.approx([lr]), (cls, g["lrs"])
    assert g["wd"]["vector"] == {0.0} and g["wd"]["hidden"] == {1.0}
    stds = g["stds"]
    assert {"embedding.word_embeddings.weight", "embedding.ngram_tables",
            "mtp_head.embedding.weight"} == set(stds["embedding"])
    for n, v in stds["embedding"].items():
        assert v == pytest.approx(BASE_STD, rel=0.1), n
    hidden = BASE_STD / math.sqrt(s)
    for n in ("decoder.layers.0.mlp.router.weight", "embedding.post_projs.0.weight",
              "decoder.layers.0.mlps_0.linear_fc1.weight", "mtp_head.eh_proj.weight",
              "decoder.layers.0.self_attention_0.linear_q_up_proj.weight"):
        assert stds["hidden"][n] == pytest.approx(hidden, rel=0.15), n
    assert stds["unembedding"]["output_layer.weight"] == pytest.approx(hidden, rel=0.1)
    # Output projections keep megatron's extra 1/sqrt(2 L) on top of the hidden std.
    assert stds["hidden"]["decoder.layers.0.mlps_0.linear_fc2.weight"] == pytest.approx(hidden / 2, rel=0.15)
