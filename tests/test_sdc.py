"""Silent-data-corruption detection (training/sdc.py) on 2 gloo ranks, the tiny LongCat at TP2 + SP
(MLA, MoE with zero experts, MTP), deterministic mode on:

* a clean run with the replay check every step and the rerun state machine validating every loss
  reports nothing and trains bitwise like the same run with both off (the checks do not change
  training); a PP2 run (the replay goes through megatron's pipeline schedule) is clean too;
* a bit flipped once in rank 1's forward at iteration 3: the replay check finds it on rank 1 only,
  the run stops with exit 78 before the optimizer step, no checkpoint is written after iteration 2,
  and the fault is recorded with rank, host and iteration (sdc.jsonl, $LONGCAT_SDC_FILE);
* a NaN loss once on rank 0 at iteration 3 (a transient fault): megatron's rerun state machine re-runs
  the step, the re-run is clean: exit 78 naming rank 0;
* a NaN loss at iteration 3 on every run of the step (numerics): the re-run reproduces it, no fault
  is reported, the stability guard skips the update and the run finishes (exit 0);
* both re-run cases again at the recipes' settings (bf16, distributed optimizer with both overlaps,
  EP2 with DP2): the re-run and the steps after it run under the overlapped gathers.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket

import pytest

from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_longcat.yaml")
BASE = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=4",
        "schedule.warmup_iters=1", "train.deterministic=true"]
CHECKS = ["train.sdc_check_interval=1", "train.rerun_mode=validate_results"]
PP2 = ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.pipeline=2"]
SHIPPED = ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.expert=2", "optimizer.bf16=true",
           "parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
           "parallel.overlap_param_gather=true", "train.train_iters=5"]


def _run(overrides: list, fault: str = "", save: str | None = None):
    from longcat_megatron.config import load_config
    from longcat_megatron.training import loop

    os.environ["LONGCAT_FAULT_INJECT"] = fault
    ckpt = [f"checkpoint.save={save}", "checkpoint.save_interval=2"] if save else []
    try:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            r = loop.train(load_config(CONFIG, BASE + overrides + ckpt))
        return r.exit_code, r.iteration, r.losses, text.getvalue()
    finally:
        os.environ["LONGCAT_FAULT_INJECT"] = ""


def _job(tmp: str) -> dict:
    from longcat_megatron.training.checkpointing import read_tracker
    from longcat_megatron.training.sdc import read_records

    os.environ["LONGCAT_SDC_FILE"] = os.path.join(tmp, "sdc-hosts")
    flip_dir, transient_dir = os.path.join(tmp, "flip"), os.path.join(tmp, "transient")
    out = {"plain": _run([]), "checked": _run(CHECKS)}
    out["flip"] = _run(CHECKS, "bit_flip:3:1", save=flip_dir)
    out["transient"] = _run(["train.rerun_mode=validate_results"], "transient_nan:3:0", save=transient_dir)
    out["numerics"] = _run(["train.rerun_mode=validate_results"], "nan_loss:3")
    out["pp2"] = _run(CHECKS + PP2)
    # the re-run at the recipes' settings: bf16, distributed optimizer, both overlaps, EP2, DP2
    out["shipped_numerics"] = _run(["train.rerun_mode=validate_results"] + SHIPPED, "nan_loss:3")
    out["shipped_transient"] = _run(["train.rerun_mode=validate_results"] + SHIPPED, "transient_nan:3:1")
    # read after the last run: its collectives mean every rank has written what it records
    out["flip_records"] = (read_tracker(flip_dir), read_records(flip_dir))
    from longcat_megatron import status

    out["status"] = status.render(status.collect(flip_dir))
    out["transient_records"] = read_records(transient_dir)
    out["hosts_file"] = open(os.environ["LONGCAT_SDC_FILE"]).read()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_job, 2, str(tmp_path_factory.mktemp("sdc")))


def test_clean_run_reports_nothing_and_trains_as_without_checks(runs):
    for r in runs:
        plain, checked = r["plain"], r["checked"]
        assert plain[0] == checked[0] == 0 and checked[1] == 4
        assert checked[2] == plain[2]  # bitwise: the same floats at every iteration
        assert "[sdc]" not in checked[3]


def test_replay_through_the_pipeline_schedule_is_clean(runs):
    for r in runs:
        code, iteration, losses, log = r["pp2"]
        assert (code, iteration) == (0, 4) and "[sdc]" not in log


def test_bit_flip_on_one_rank_is_found_by_the_replay_and_stops_with_78(runs):
    for r in runs:
        code, iteration, losses, _ = r["flip"]
        assert (code, iteration) == (78, 2) and sorted(losses) == [1, 2]
        assert r["flip_records"][0] == 2  # nothing committed after the last good iteration
        records = r["flip_records"][1]
        assert [(x["rank"], x["iteration"]) for x in records] == [(1, 3)]
        assert records[0]["host"] == socket.gethostname().split(".")[0]
        assert "replayed forward" in records[0]["fault"]
    assert f"silent data corruption at iteration 3: rank 1 on host {socket.gethostname().split('.')[0]}" \
        in runs[0]["status"]
    log = runs[0]["flip"][3]
    assert "silent data corruption detected at iteration 3 on rank(s) 1" in log
    host_lines = [line.split("\t") for line in runs[0]["hosts_file"].splitlines()]
    host = socket.gethostname().split(".")[0]
    # the bit flip, the transient NaN, the transient NaN at the shipped settings
    assert [tuple(x[:3]) for x in host_lines] == [("3", "1", host), ("3", "0", host), ("3", "1", host)]


def test_transient_nan_is_rerun_by_megatrons_state_machine_and_is_a_fault(runs):
    for r in runs:
        code, iteration, _, _ = r["transient"]
        assert (code, iteration) == (78, 2)
        assert [(x["rank"], x["iteration"]) for x in r["transient_records"]] == [(0, 3)]
        assert "did not reproduce" in r["transient_records"][0]["fault"]
    assert "re-running the step" in runs[0]["transient"][3]


def test_reproduced_nan_is_numerics_left_to_the_stability_guard(runs):
    for r in runs:
        code, iteration, losses, log = r["numerics"]
        assert (code, iteration) == (0, 4)
        assert math.isnan(losses[3]) and not math.isnan(losses[4])
    assert "reproduced the non-finite loss" in runs[0]["numerics"][3]
    assert "SILENT DATA CORRUPTION" not in runs[0]["numerics"][3]


def test_rerun_works_under_the_shipped_overlaps_and_expert_parallelism(runs):
    for r in runs:
        code, iteration, losses, _ = r["shipped_numerics"]  # re-run, update skipped, training goes on
        assert (code, iteration) == (0, 5) and math.isnan(losses[3]) and not math.isnan(losses[5])
        code, iteration, _, _ = r["shipped_transient"]
        assert (code, iteration) == (78, 2)
    assert "reproduced the non-finite loss" in runs[0]["shipped_numerics"][3]
    assert "silent data corruption detected at iteration 3 on rank(s) 1" in runs[0]["shipped_transient"][3]


def test_sdc_check_needs_deterministic_mode():
    from longcat_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.deterministic=true"):
        load_config(CONFIG, ["train.sdc_check_interval=5"])
    with pytest.raises(ConfigError, match="train.rerun_mode"):
        load_config(CONFIG, ["train.rerun_mode=on"])


def test_dry_run_lists_the_settings():
    from longcat_megatron.train import main as train_main

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert train_main(["--config", CONFIG, "--dry-run", "--world-size", "2", *BASE, *CHECKS]) == 0
    out = text.getvalue()
    assert "determinism and silent-data-corruption detection:" in out
    assert "deterministic: on (CUBLAS_WORKSPACE_CONFIG=:4096:8, NCCL_ALGO=Ring" in out
    assert "rerun state machine: validate_results" in out
    assert "replay check: every 1 iteration(s)" in out and "exit 78" in out
