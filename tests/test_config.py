"""Config loading: typed fields, overrides, and bad input giving one clear paragraph, no traceback."""

import os
import subprocess
import sys

import pytest

from longcat_megatron.config import ConfigError, load_config, save_config
from longcat_megatron.errors import UserInputError
from tests.train_utils import ROOT, TINY


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["parallel.tensor=2", "optimizer.lr=5e-4", "data.paths=[0.3, a, 0.7, b]",
                             "data.mock=true"])
    assert cfg.parallel.tensor == 2 and cfg.optimizer.lr == 5e-4
    assert cfg.data.prefixes() == ["a", "b"] and cfg.data.weights() == [0.3, 0.7]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.train_iters=7"])
    path = tmp_path / "run_config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("overrides,match", [
    (["model.hiden_size=8"], r"unknown field 'model.hiden_size'.*Allowed fields of model: .*hidden_size"),
    (["train.train_iters=many"], r"train.train_iters: expected an integer, got 'many'"),
    (["parallel.sequence_parallel=3"], r"parallel.sequence_parallel: expected true/false"),
    (["parallel.tensor=3"], r"parallel.tensor=3 does not divide model.num_attention_heads=4"),
    (["data.mock=false", "data.paths=[/nonexistent/corpus]"], r"'/nonexistent/corpus.bin' does not exist"),
    (["data.mock=false"], r"data.paths is empty"),
    (["schedule.style=cosin"], r"schedule.style='cosin': use cosine, linear, constant or wsd"),
    (["train.global_batch_size=7"], r"not a multiple of train.micro_batch_size=2"),
    (["parallel.tensor"], r"not of the form section.field=value"),
    (["parallel.expert_tensor=0"], r"parallel.expert_tensor=0 must be >= 1"),
    (["parallel.distributed_optimizer=false", "parallel.overlap_param_gather=true"],
     r"parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
    (["model.expert_impl=fast"], r"model.expert_impl='fast': use grouped, sequential or te"),
    # what training would crash on, caught by the config check (and so by --dry-run)
    (["parallel.sequence_parallel=true"], r"sequence_parallel=true needs parallel.tensor > 1"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_length=63"],
     r"data.seq_length=63 must be divisible by parallel.tensor x parallel.context = 2"),
    (["checkpoint.keep_last=-1"], r"checkpoint.keep_last=-1 must be >= 0"),
    (["checkpoint.verify_on_load=false", "checkpoint.fallback_on_corruption=true"],
     r"fallback_on_corruption=true needs checkpoint.verify_on_load=true"),
])
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(UserInputError, match=match):
        load_config(TINY, overrides)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "longcat_megatron.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["model.bogus=1"], "unknown field 'model.bogus'"),
    (["parallel.tensor=3"], "does not divide model.num_attention_heads"),
    (["data.mock=false", "data.paths=[/no/such/prefix]"], "/no/such/prefix.bin' does not exist"),
])
def test_cli_bad_config_exits_with_one_paragraph(args, needle):
    proc = _cli("--config", TINY, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_dry_run_plans_and_rejects_bad_world():
    ok = _cli("--config", TINY, "--dry-run", "--world-size", "4", "parallel.tensor=2")
    assert ok.returncode == 0, ok.stderr
    assert "TP2 x CP1 x PP1 x DP2" in ok.stdout and "memory per rank" in ok.stdout
    bad = _cli("--config", TINY, "--dry-run", "--world-size", "3", "parallel.tensor=2")
    assert bad.returncode == 2 and "world size 3 is not divisible" in bad.stderr


def test_example_configs_are_valid():
    """Every shipped config loads (data files are not built in a fresh clone: mock data)."""
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml"))
    assert "tiny.yaml" in names and "longcat_flash_lite.yaml" in names
    for name in names:
        load_config(os.path.join(ROOT, "configs", name), ["data.mock=true"])


def test_ngram_eos_must_match_the_data_eos():
    cfg_path = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")
    load_config(cfg_path, ["data.mock=true"])
    with pytest.raises(ConfigError, match=r"model.ngram.eos_token_id=5 but documents end with token 2"):
        load_config(cfg_path, ["data.mock=true", "model.ngram.eos_token_id=5"])


def test_document_masks_at_long_sequences_need_the_longcat_model():
    """LongCat masks packed documents at any length; megatron's GPTModel only with a dense mask."""
    long = ["data.mock=true", "data.reset_attention_mask=true", "data.seq_length=16384",
            "model.max_position_embeddings=16384"]
    load_config(os.path.join(ROOT, "configs", "tiny_longcat.yaml"), long)
    with pytest.raises(ConfigError, match=r"model.arch=gpt .* dense \[s, s\] mask"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), long)


def test_dry_run_counts_longcat_parameters_like_the_model_summary():
    """The plan's total for LongCat-Flash-Lite is the summary's 68.56B (MTP excluded)."""
    proc = _cli("--config", os.path.join(ROOT, "configs", "longcat_flash_lite.yaml"), "--dry-run",
                "--world-size", "256", "data.mock=true")
    assert proc.returncode == 0, proc.stderr
    assert "model.arch=longcat: 68.562B parameters" in proc.stdout
