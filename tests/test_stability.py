"""The stability suite (training/stability.py, training/router_stability.py).

One 1-process job: an injected NaN loss twice within the window stops the run with exit 77 naming
the last good checkpoint (nothing saved after it); an injected NaN *gradient* (finite loss) is
skipped by megatron's found_inf check (the LR schedule does not advance); two injected loss spikes
roll the run back (exit 75), and the restart skips the unstable batches plus
``train.spike_skip_batches`` more: the first batch trained after the range is the one at the
expected data position. ``--dry-run`` lists the settings.
One 2-process gloo job (DP=2): R_g per layer equals the ratio measured from the reduced gradients
of two runs with and without the LB loss (identical on both ranks), under the collective audit.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess

import pytest

from tests.harness import run_distributed
from tests.test_collectives import check_collective_audit, install_collective_audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_longcat.yaml")
GBS = 4
BASE = ["parallel.tensor=1", "parallel.sequence_parallel=false", "model.mtp_num_layers=0",
        "data.seq_length=32", "train.micro_batch_size=2", f"train.global_batch_size={GBS}",
        "schedule.warmup_iters=1", "logging.router_stability=false"]


def _train(overrides: list, fault: str = "", record: list | None = None):
    from longcat_megatron.config import load_config
    from longcat_megatron.training import loop

    os.environ["LONGCAT_FAULT_INJECT"] = fault
    original = loop.forward_step
    if record is not None:
        def forward_step(data_iterator, model):  # note each micro-batch's first tokens
            batch = next(data_iterator)
            record.append(batch["tokens"][0, :8].tolist())
            return original(iter([batch]), model)

        loop.forward_step = forward_step
    try:
        return loop.train(load_config(CONFIG, BASE + overrides))
    finally:
        loop.forward_step = original
        os.environ["LONGCAT_FAULT_INJECT"] = ""


def _guard_job(tmp: str) -> dict:
    from longcat_megatron.config import load_config
    from longcat_megatron.train import main as train_main
    from longcat_megatron.training import loop
    from longcat_megatron.training.checkpointing import read_tracker
    from longcat_megatron.training.stability import read_records

    out: dict = {}
    # 0. Reference for R_g: one step with and without the LB loss (the LM part is the same).
    out["metrics_dp1"], grads = _balance((LB, 0.0))
    out["reference"] = {i: float((grads[LB][i] - grads[0.0][i]).norm() / grads[0.0][i].norm())
                        for i in grads[0.0]}
    # 1. NaN loss at 3 and 4 with a limit of 2: exit 77, nothing saved after iteration 2.
    stop_dir = os.path.join(tmp, "stop")
    r = _train(["train.train_iters=8", "train.instability_limit=2", f"checkpoint.save={stop_dir}",
                "checkpoint.save_interval=2"], fault="nan_loss:3-4")
    out["stop"] = (r.exit_code, r.iteration, read_tracker(stop_dir), read_records(stop_dir)["stops"])
    # 2. NaN gradient, finite loss: megatron's found_inf skips the update; the LR stays put.
    r = _train(["train.train_iters=4"], fault="nan_grad:3")
    out["found_inf"] = (r.exit_code, r.losses[3], r.grad_norms[3], r.lrs[2], r.lrs[3], r.lrs[4])
    # 3. Spikes at 6 and 7 (5 accepted losses before), limit 2, rollback skipping 2 more batches.
    roll_dir = os.path.join(tmp, "roll")
    over = ["train.train_iters=11", "train.instability_limit=2", "train.spike_rollback=true",
            "train.spike_skip_batches=2", f"checkpoint.save={roll_dir}", "checkpoint.save_interval=2"]
    first = _train(over, fault="spike_loss:6-7")
    out["rollback"] = (first.exit_code, first.stop_reason, first.iteration, read_tracker(roll_dir),
                       read_records(roll_dir)["rollbacks"])
    seen: list = []
    second = _train(over, fault="spike_loss:6-7", record=seen)
    cfg = load_config(CONFIG, BASE + over)

    class Layout:
        virtual_pipeline = None

    (iterator,), _ = loop._build_iterators(cfg, Layout(), 9 * GBS)   # after iteration 9
    out["resume"] = (second.exit_code, second.resumed_from, sorted(second.losses), read_tracker(roll_dir))
    out["after_skip"] = (seen[0], next(iterator)["tokens"][0, :8].tolist())
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        train_main(["--config", CONFIG, "--dry-run", "--world-size", "1", *BASE])
    out["dry_run"] = text.getvalue()
    return out


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return run_distributed(_guard_job, 1, str(tmp_path_factory.mktemp("stability")))[0]


def test_non_finite_limit_stops_with_77_naming_the_last_good_checkpoint(guard):
    code, iteration, tracker, stops = guard["stop"]
    assert (code, iteration, tracker) == (77, 4, 2)          # stopped at 4, no save at 4 or after
    assert stops and "iter_0000002 (iteration 2)" in stops[-1]["message"]
    assert "iterations 3, 4" in stops[-1]["message"]


def test_non_finite_gradient_is_skipped_by_megatron_found_inf(guard):
    code, loss3, norm3, lr2, lr3, lr4 = guard["found_inf"]
    assert code == 0 and loss3 == loss3                      # the loss itself was finite
    assert norm3 != norm3                                    # no grad norm: the step was skipped
    assert lr3 == lr2 and lr4 != lr3                         # the schedule did not advance at 3


def test_spike_rollback_skips_the_batches_past_the_spike(guard):
    code, reason, iteration, tracker, rollbacks = guard["rollback"]
    assert (code, reason, iteration, tracker) == (75, "spike rollback", 7, 6)
    assert [(r["skip_from"], r["skip_to"]) for r in rollbacks] == [(6, 9)]
    code, resumed, trained, tracker = guard["resume"]
    assert (code, resumed, tracker) == (0, 6, 11)
    assert trained == [10, 11]                               # 7, 8, 9 consumed untrained
    seen, expected = guard["after_skip"]
    assert seen == expected                                  # iteration 10 reads samples 36.. (9 x 4)


def test_dry_run_lists_the_stability_settings(guard):
    text = guard["dry_run"]
    assert "stability:" in text and "loss spike: loss > 3 x median" in text
    assert "instability limit: 5 skipped step(s) within 100 iterations -> stop, exit 77" in text
    assert "router stability (R_g, expert cosine): off" in text


LB = 0.01


def _balance(coeffs: tuple) -> tuple:
    """(R_g metrics of the first run's step 1, {layer: router weight main_grad} per coefficient)."""
    from longcat_megatron.training import router_stability as rs
    from longcat_megatron.training.setup import unwrap

    seen: list = []
    original = rs.RouterStability.collect

    def collect(self):
        out = original(self)
        seen.append(out)
        return out

    rs.RouterStability.collect = collect
    grads = {}
    try:
        for c in coeffs:
            r = _train(["train.train_iters=1", "logging.router_stability=true",
                        "parallel.distributed_optimizer=false", f"model.device_lb_loss_coeff={c}"])
            grads[c] = {i: router.weight.main_grad.clone() for i, router in unwrap(r.model_chunks[0]).routers()}
    finally:
        rs.RouterStability.collect = original
    return seen[0], grads


def _balance_job() -> dict:
    from longcat_megatron import runtime

    records = install_collective_audit()
    metrics, _ = _balance((LB,))
    check_collective_audit(records, str(runtime.device()))
    return metrics


def test_gradient_balance_ratio_matches_the_reduced_gradients_under_dp2(guard):
    results = run_distributed(_balance_job, 2)
    assert results[0] == results[1]                          # every DP rank reports the same figures
    metrics, ref = results[0], guard["reference"]
    # DP=2 over the same global batch as the 1-process reference runs: the same global gradients
    # The last layer's LB loss reaches its router only directly: equal to float noise. Layer 0's
    # reference also holds layer 1's LB loss through the hidden states (R_g is per layer): ~0.1%.
    assert metrics["moe/layer1/grad_balance"] == pytest.approx(ref[1], rel=1e-4)
    assert metrics["moe/layer0/grad_balance"] == pytest.approx(ref[0], rel=5e-3)
    assert metrics["progress/Rg-max"] == max(metrics["moe/layer0/grad_balance"],
                                             metrics["moe/layer1/grad_balance"])
    assert 0 < metrics["moe/layer0/expert_cosine"] < 1
    assert metrics == pytest.approx(guard["metrics_dp1"], rel=1e-5)


def test_cosine_and_warning_patience():
    import torch

    from longcat_megatron.training.router_stability import RouterStability, mean_pairwise_cosine

    w = torch.randn(6, 5)
    unit = torch.nn.functional.normalize(w, dim=-1)
    gram = unit @ unit.T
    brute = float((gram.sum() - gram.diag().sum()) / 30)
    assert mean_pairwise_cosine(w) == pytest.approx(brute, abs=1e-6)
    warnings: list = []
    probe = RouterStability(True, 1, 0.1, 2, 2, warnings.append)
    for r in (0.2, 0.05, 0.2, 0.3, 0.4):                     # above, reset, above twice -> one warning
        probe._metrics(torch.tensor([[r, 0.01], [0.5, 0.5]], dtype=torch.float64))
    assert len(warnings) == 1 and "layer 0" in warnings[0] and "R_g = 0.3" in warnings[0]


def test_launcher_does_not_requeue_77_and_status_explains_it(tmp_path):
    from longcat_megatron.status import RunStatus, render

    codes = tmp_path / "codes"
    codes.write_text("77\n1\n")
    out = subprocess.run(["bash", "-c", f'source launch/common.sh; lc_stopped_for_instability "{codes}"; '
                          f'echo "rc=$?"; lc_stopped_for_instability /nonexistent; echo "rc=$?"'],
                         cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert [w for w in out.stdout.split() if w.startswith("rc=")] == ["rc=0", "rc=1"], out
    assert "stopped for instability (exit 77" in out.stderr + out.stdout
    st = RunStatus(run_dir=str(tmp_path))
    st.launches.failures.append(("2026-01-01T00:00", 77, "job=1 restart=0"))
    st.scalars = {"moe/layer0/grad_balance": ([5], [0.04], [0.0]),
                  "moe/layer1/grad_balance": ([5], [0.12], [0.0])}
    st.stability = {"rollbacks": [{"number": 1, "skip_from": 6, "skip_to": 9, "reason": "spikes"}],
                    "stops": [{"iteration": 12, "message": "Last good checkpoint: X"}]}
    text = render(st)
    assert "exit 77 at 2026-01-01T00:00 (job=1 restart=0): stopped for instability" in text
    assert "router R_g (bound 0.1): max 0.12 (layer1), mean 0.08 over 2 layer(s)" in text
    assert "rollback 1: iterations 6..9 skipped" in text and "Last good checkpoint: X" in text
