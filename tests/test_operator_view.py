"""What an operator sees: FLOP count, the progress line's figures, per-rank logs, the status tool."""

from tests.harness import run_distributed
from tests.longcat_tiny import tiny_config


def _counted_vs_formula(overrides: dict):
    """(FLOPs torch's FlopCounterMode counts in one training-mode forward, our formula's figure
    for the same tokens at the measured experts per token)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from longcat_megatron import runtime
    from longcat_megatron.model.factory import transformer_config
    from longcat_megatron.model.flops import forward_flops_per_token
    from longcat_megatron.model.longcat import build_longcat_chunk

    runtime.initialize(seed=3)  # re-entrant: rebuilds the groups
    cfg = tiny_config(**overrides)
    model = build_longcat_chunk(cfg, transformer_config(cfg), pre_process=True, post_process=True).train()
    b, s = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(s)[None].expand(b, -1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(ids, pos, None, labels=ids, loss_mask=torch.ones(b, s))
    picks = torch.stack([r.step_picks for _, r in model.routers()])  # [layers, experts]
    k = float(picks[:, : cfg.num_experts].sum()) / (cfg.num_layers * b * s)
    return counter.get_total_flops(), forward_flops_per_token(cfg, s, k, causal=False) * b * s


def _both_variants():
    # Plain matmuls only: FlopCounterMode does not count torch._grouped_mm (grouped experts), and it
    # counts SDPA's zero-padded v head dims (model/attention.py), which are not model FLOPs.
    plain = {"expert_impl": "sequential", "attention_backend": "eager"}
    return [_counted_vs_formula(plain), _counted_vs_formula({**plain, "mtp_num_layers": 1})]


def test_flops_formula_matches_counted_matmuls():
    """Every matmul FlopCounterMode sees in a forward (MLA, dense MLPs, router, the experts actually
    chosen, LM head, MTP) is in the formula: equal within 2% (exactly equal today)."""
    for counted, formula in run_distributed(_both_variants, 1)[0]:
        assert abs(counted - formula) / counted < 0.02, (counted, formula)


def _train_capturing(overrides: list, log_path: str) -> dict:
    import contextlib

    from tests.train_utils import run_training

    with open(log_path, "w") as f, contextlib.redirect_stdout(f):
        out = run_training(overrides)
    out.pop("weights")
    return out


def _consumed(ckpt_root, iteration: int) -> int:
    import torch

    state = torch.load(ckpt_root / f"iter_{iteration:07d}" / "common.pt", weights_only=False)
    return int(state["consumed_train_samples"])


def test_batch_ramp_progress_line_and_status(tmp_path, capsys):
    """train.batch_schedule: global batch 4 -> 8 once 700 tokens (seq 64) are consumed, i.e. from
    step 4 on; the data position after each step is the sum of the batches; stopping at step 3 and
    resuming gives the uninterrupted run's losses exactly. The progress line shows tokens, FLOP/s
    (consistent with the model's FLOP count) and memory; the status tool reads the run."""
    import re

    from longcat_megatron.config import load_config
    from longcat_megatron.model.flops import training_flops_per_token
    from longcat_megatron.status import main as status_main
    from tests.train_utils import TINY

    base = ["checkpoint.keep_last=0", "train.train_iters=6", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.batch_schedule=['700:8']", "checkpoint.save_interval=1", "schedule.warmup_iters=1"]
    a = tmp_path / "a"
    straight = run_distributed(_train_capturing, 1, base + [f"checkpoint.save={a}",
                                                          f"logging.tensorboard_dir={a / 'tensorboard'}"],
                               str(tmp_path / "a.log"))[0]
    consumed = [_consumed(a, i) for i in range(1, 7)]
    assert [y - x for x, y in zip([0] + consumed, consumed)] == [4, 4, 4, 8, 8, 8]
    b = tmp_path / "b"
    first = run_distributed(_train_capturing, 1, base + [f"checkpoint.save={b}", "train.exit_interval=3"],
                            str(tmp_path / "b1.log"))[0]
    second = run_distributed(_train_capturing, 1, base + [f"checkpoint.save={b}"], str(tmp_path / "b2.log"))[0]
    assert second["resumed_from"] == 3 and _consumed(b, 6) == 36
    assert {**first["losses"], **second["losses"]} == straight["losses"]

    lines = [ln for ln in open(tmp_path / "a.log") if ln.startswith("iter ")]
    assert len(lines) == 6
    m = re.search(r"tokens (\S+) \| ([\d,]+) tok/s \| ([\d.]+) GFLOP/s/rank \| mem ([\d.]+) GB RSS", lines[-1])
    assert m and m.group(1) == "2.30k", lines[-1]  # 36 samples x 64 tokens
    fpt = training_flops_per_token(load_config(TINY, ["data.mock=true"]).model, 64)
    gflops = fpt * float(m.group(2).replace(",", "")) / 1e9
    assert abs(float(m.group(3)) - gflops) <= 0.01 + 0.02 * gflops, (lines[-1], gflops)
    assert float(m.group(4)) > 0.05

    (a / "logs").mkdir()
    (a / "logs" / "events.log").write_text(
        "2026-01-01T00:00:00Z start job=7 restart=0 host=n1 world=1\n"
        "2026-01-01T01:00:00Z exit rc=75 job=7 restart=0 host=n1\n"
        "2026-01-01T01:05:00Z start job=7 restart=1 host=n1 world=1\n"
        "2026-01-01T02:00:00Z exit rc=1 job=7 restart=1 host=n1\n")
    capsys.readouterr()
    assert status_main([str(a)]) == 0
    out = capsys.readouterr().out
    assert "last committed checkpoint: iteration 6" in out and "iteration: 6/6" in out
    assert "tokens: 2.30k of 2.30k" in out
    assert f"loss: {straight['losses'][6]:.4f}" in out
    assert "2 start(s), 1 requeue(s) (exit 75), 1 failure(s)" in out and "exit 1 at 2026-01-01T02:00:00Z" in out
    png = (a / "logs" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert status_main([str(tmp_path / "nowhere")]) == 2


def test_rank_wrapper_splits_logs_and_records_events(tmp_path):
    """launch/rank.sh: rank 0 stays on stdout (the job log) and records start/exit in events.log;
    another rank appends to logs/rank-00001.log; exit 75 leaves the requeue marker."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    marker = tmp_path / "requeue"

    def rank(r: int, code: int):
        env = dict(os.environ, RANK=str(r), LONGCAT_RUN_DIR=str(run), LONGCAT_REQUEUE_MARKER=str(marker),
                   SLURM_JOB_ID="42", SLURM_RESTART_COUNT="1", WORLD_SIZE="2")
        return subprocess.run(["bash", os.path.join(root, "launch/rank.sh"), "bash", "-c",
                               f"echo hello from {r}; echo oops >&2; exit {code}"],
                              env=env, capture_output=True, text=True, timeout=30)

    out0, out1 = rank(0, 75), rank(1, 3)
    assert out0.returncode == 75 and "hello from 0" in out0.stdout and marker.exists()
    assert out1.returncode == 3 and out1.stdout == "" and out1.stderr == ""
    text1 = (run / "logs" / "rank-00001.log").read_text()
    assert "rank 1 job=42 restart=1" in text1 and "hello from 1" in text1 and "oops" in text1
    events = (run / "logs" / "events.log").read_text().splitlines()
    assert [e.split()[1] for e in events] == ["start", "exit"] and "rc=75 job=42 restart=1" in events[1]
