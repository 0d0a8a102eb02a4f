"""Published recipes: stage files, guess labels, token budgets in any notation, batch schedules."""

import os
import subprocess

import pytest

from longcat_megatron.recipe import labelled_values, stage_iterations, stage_overrides
from longcat_megatron.training import batch_schedule as bs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"lite": "configs/longcat_flash_lite.yaml", "flash": "configs/longcat_flash.yaml"}
STAGES = ["pretrain", "midtrain_32k", "midtrain_128k", "sft"]
# Not published for either model: each must be labelled "# guess:" wherever a recipe file sets it.
NEVER_PUBLISHED = {"optimizer.lr", "optimizer.min_lr", "train.global_batch_size", "schedule.warmup_iters",
                   "schedule.style", "model.budget_rate", "model.mtp_loss_scaling_factor"}


def _labels(model, stage):
    merged = {}
    for path in (CONFIGS[model], f"configs/stages/{model}_{stage}.yaml"):
        for item in labelled_values(os.path.join(ROOT, path)):
            merged[item.key] = item
    return merged


@pytest.mark.parametrize("model", ["lite", "flash"])
@pytest.mark.parametrize("stage", STAGES)
def test_unpublished_values_are_labelled_guesses(model, stage):
    labels = _labels(model, stage)
    for key in NEVER_PUBLISHED:
        assert labels[key].kind == "guess" and labels[key].why, (key, labels[key])
    if model == "lite":
        assert labels["model.budget_target_ffn_experts"].kind == "guess"  # K_e of Lite
        assert labels["model.yarn_original_max_position_embeddings"].kind == "guess"
    if stage == "sft":
        # No SFT setting is published: every optimizer/schedule/budget value the SFT file sets is a guess.
        sft_values = [i for k, i in labels.items() if i.source.endswith("_sft.yaml")
                      and k.startswith(("optimizer.", "schedule.", "recipe.", "train."))]
        assert sft_values and all(i.kind != "published" for i in sft_values)


def test_stage_values_follow_the_publications():
    def resolved(model, stage):
        from longcat_megatron.config import load_config

        f = os.path.join(ROOT, f"configs/stages/{model}_{stage}.yaml")
        return load_config(os.path.join(ROOT, CONFIGS[model]), stage_overrides(f) + ["data.mock=true"]), f

    expect = {  # (seq, rope type, base, budget tokens)
        ("flash", "pretrain"): (8192, "rope", 1e6, 20e12), ("flash", "midtrain_32k"): (32768, "rope", 5e6, 80e9),
        ("flash", "midtrain_128k"): (131072, "rope", 1e7, 20e9),
        ("lite", "pretrain"): (8192, "rope", 5e6, 11e12), ("lite", "midtrain_32k"): (32768, "yarn", 5e6, 1.2e12),
        ("lite", "midtrain_128k"): (131072, "yarn", 5e6, 0.3e12),
    }
    for (model, stage), (seq, rope, base, budget) in expect.items():
        cfg, f = resolved(model, stage)
        assert (cfg.data.seq_length, cfg.model.rope_type, cfg.model.rotary_base) == (seq, rope, base), (model, stage)
        iters, _, tokens = stage_iterations(os.path.join(ROOT, CONFIGS[model]), f)
        assert tokens == budget
        got = bs.samples_for_iterations(iters, cfg.train.global_batch_size, cfg.train.batch_schedule, seq) * seq
        assert got >= budget > bs.samples_for_iterations(iters - 1, cfg.train.global_batch_size,
                                                         cfg.train.batch_schedule, seq) * seq
    lite, _ = resolved("lite", "pretrain")
    assert bs.parse(lite.train.batch_schedule)[0][0] == 420e9  # the published batch raise


def test_token_budget_notations_and_schedule_arithmetic():
    assert bs.parse_tokens("11T") == bs.parse_tokens("11e12") == bs.parse_tokens(11e12) == 11 * 10**12
    assert bs.parse_tokens("1.5e12") == bs.parse_tokens("1.5T") and bs.parse_tokens("420B") == 420 * 10**9
    with pytest.raises(bs.BatchScheduleError, match="not a token count"):
        bs.parse_tokens("11 trillion")
    with pytest.raises(bs.BatchScheduleError, match="thresholds must increase"):
        bs.parse(["2k:8", "1k:16"])
    with pytest.raises(bs.BatchScheduleError, match=r"batch_schedule\[0\].*multiple of micro_batch_size"):
        bs.check(4, ["1k:6"], micro_batch_size=4)
    sched = ["700:8", {"after_tokens": 2000, "global_batch_size": 12}]
    # Step by step: the batch of a step is chosen by the tokens consumed before it.
    consumed, seen = 0, []
    for _ in range(12):
        b = bs.batch_at(consumed, 64, 4, bs.parse(sched))
        seen.append(b)
        consumed += b
        assert bs.samples_for_iterations(len(seen), 4, sched, 64) == consumed
    assert seen == [4, 4, 4, 8, 8, 8, 12, 12, 12, 12, 12, 12]  # 768 >= 700 after 3 steps, 2304 >= 2000 after 6
    for budget in (1, 700, 768, 3000, 5000):
        n = bs.iterations_for_tokens(budget, 4, sched, 64)
        assert bs.samples_for_iterations(n, 4, sched, 64) * 64 >= budget
        assert n == 0 or bs.samples_for_iterations(n - 1, 4, sched, 64) * 64 < budget


def test_flash_stage_script_dry_run_lists_guesses():
    env = dict(os.environ, MODEL="flash", TOKEN_BUDGET="80e9", NNODES="128", NPROC_PER_NODE="8",  # EP32 x TP8 x PP4
               LONGCAT_ROOT=ROOT, STAGE="32k")
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(["bash", "launch/midtrain.sh", "--dry-run", "data.mock=true"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "recipe: configs/longcat_flash.yaml + configs/stages/flash_midtrain_32k.yaml; 2385 iterations" in text
    assert "GUESSED values" in text and "optimizer.lr = 1.0e-4" in text
    assert "model.rotary_base = 5000000.0" in text


def test_explicit_train_iters_keep_the_stage_files_decay_fraction():
    """TRAIN_ITERS=N launch/midtrain.sh: N iterations, WSD decay = the stage file's fraction of N."""
    from longcat_megatron.recipe import stage_iterations, stage_recipe

    stage = os.path.join(ROOT, "configs", "stages", "lite_midtrain_32k.yaml")
    fraction = float(stage_recipe(stage)["wsd_decay_fraction"])
    assert fraction != 0.1                                  # else this test could not tell
    config = os.path.join(ROOT, "configs", "longcat_flash_lite.yaml")
    assert stage_iterations(config, stage, train_iters=1000) == (1000, int(1000 * fraction), 0)
