"""The embedding-vs-experts study harness (longcat_megatron/study, docs/embedding_study.md).

A tiny spec with two matched runs (more FFN experts / N-gram Embedding to the same total/activated
ratio, 4 iterations each) on a small tiny_corpus: the report's table and plots appear and the
totals match the meta-device build; a second invocation trains nothing; a bad spec names its field;
the SLURM array path (launch/study.sh) trains both runs as array tasks and a dependent
--report-only job aggregates them (skipped without a local SLURM unless LONGCAT_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.slurm.cluster import ROOT, Job, slurm_cluster  # noqa: F401 (fixture)

TARGET = 2.5

BASE = {
    "model": {
        "arch": "longcat", "num_layers": 1, "hidden_size": 48, "num_attention_heads": 2,
        "ffn_hidden_size": 96, "vocab_size": 512, "max_position_embeddings": 128, "num_experts": 4,
        "zero_expert_num": 2, "moe_router_topk": 2, "moe_ffn_hidden_size": 16, "routed_scaling_factor": 2.0,
        "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "mtp_num_layers": 1, "mtp_loss_scaling_factor": 0.1, "budget_target_ffn_experts": 1.0,
        "budget_rate": 0.1,
    },
    "data": {"seq_length": 32, "eod_token_id": 2},
    "train": {"micro_batch_size": 2, "global_batch_size": 2, "train_iters": 4, "eval_interval": 2,
              "eval_iters": 1, "seed": 1},
    "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
    "schedule": {"style": "cosine", "warmup_iters": 1},
    "logging": {"log_interval": 1},
}
RUNS = [
    {"name": "experts_x2.5", "strategy": "experts", "scale": "experts", "target_ratio": TARGET},
    {"name": "ngram_x2.5", "strategy": "ngram", "scale": "ngram", "target_ratio": TARGET,
     "ngram": {"emb_neighbor_num": 3, "emb_split_num": 2}},
]


def write_spec(tmp, name: str, **extra) -> str:
    spec = {"name": name, "runs_dir": str(tmp / "runs"), "report": str(tmp / "report.md"),
            "figures_dir": str(tmp / "figures"), "corpus": {"tiny_max_mb": 0.3, "diagnostics_sequences": 20},
            "base": copy.deepcopy(BASE), "runs": copy.deepcopy(RUNS)}
    spec.update(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def study(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "longcat_megatron.study", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    spec = write_spec(tmp, "tiny_study")
    out = study("--spec", spec)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, spec, out


def test_report_table_plots_and_matched_totals(local_study):
    from longcat_megatron.model.summary import summarize
    from longcat_megatron.study.spec import load_spec, run_model

    tmp, spec_path, _ = local_study
    report = (tmp / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| experts_x2.5") or line.startswith("| ngram_x2.5")]
    assert len(rows) == 2, report
    for png in ("tiny_study_ratio.png", "tiny_study_curves.png"):
        path = tmp / "figures" / png
        assert path.is_file() and path.stat().st_size > 5000, png
        assert f"figures/{png}" in report
    assert f"--spec {spec_path}" in report and "```yaml" in report
    spec = load_spec(spec_path)
    results = {}
    for run in spec.runs:
        res = json.load(open(tmp / "runs" / run.name / "result.json"))
        results[run.name] = res
        assert res["final_valid_loss"] is not None and res["final_valid_loss"] < 7.0, res["final_valid_loss"]
        assert len(res["train_curve"][0]) == 4 and res["valid_curve"][0] == [2, 4]
        # the counts the harness reports are the model's own (built on the meta device)
        s = summarize(run_model(spec, run))
        assert res["total"] == s["total"] and res["activated"] == s["activated_at_target"]
        assert abs(res["ratio"] - TARGET) / TARGET < 0.03, (run.name, res["ratio"])
        assert f"{res['final_valid_loss']:.4f}" in report
    assert results["experts_x2.5"]["ngram_params"] == 0 and results["experts_x2.5"]["num_experts"] > 4
    ng = results["ngram_x2.5"]
    assert ng["num_experts"] == 4 and 0.3 < ng["ngram_share"] < 0.5
    assert 0 <= ng["collisions"]["collision_rate"] <= 1 and len(ng["collisions"]["tables"]) == 4
    assert results["experts_x2.5"]["collisions"] is None


def test_rerun_skips_finished_runs(local_study):
    tmp, spec_path, _ = local_study
    logs = {r["name"]: (tmp / "runs" / r["name"] / "runs.log").read_text() for r in RUNS}
    mtimes = {r["name"]: os.path.getmtime(tmp / "runs" / r["name"] / "result.json") for r in RUNS}
    out = study("--spec", spec_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in RUNS:
        assert f"{r['name']}: finished earlier" in out.stdout, out.stdout
        assert (tmp / "runs" / r["name"] / "runs.log").read_text() == logs[r["name"]]
        assert os.path.getmtime(tmp / "runs" / r["name"] / "result.json") == mtimes[r["name"]]
        assert logs[r["name"]].count("start attempt") == 1


def test_bad_spec_names_the_field(tmp_path):
    from longcat_megatron.study.spec import StudySpecError, parse_spec

    good = yaml.safe_load(open(write_spec(tmp_path, "ok")))
    cases = [
        (lambda s: s["runs"][1].update(scale="embeddings"), "runs[1].scale"),
        (lambda s: s["runs"][0].pop("strategy"), "runs[0].strategy"),
        (lambda s: s["base"]["train"].update(eval_interval=3), "base.train.eval_interval"),
        (lambda s: s.update(corpus={"prefx": "x"}), "corpus.prefx"),
        (lambda s: s["runs"][1]["ngram"].update(emb_split_num=5), "emb_split_num"),  # 48 % (5*2) != 0
        (lambda s: s["runs"].append(dict(s["runs"][0])), "runs[2].name"),
    ]
    for mutate, field in cases:
        spec = copy.deepcopy(good)
        mutate(spec)
        with pytest.raises(StudySpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_spec(spec)
    parse_spec(good)  # the unmutated spec is fine
    bad = tmp_path / "bad.yaml"
    spec = copy.deepcopy(good)
    spec["runs"][0]["target_ratio"] = 0.5
    bad.write_text(yaml.safe_dump(spec))
    from longcat_megatron.study.__main__ import main

    assert main(["--spec", str(bad), "--list"]) == 2


def test_slurm_array_and_report_only(slurm_cluster, local_study, tmp_path):  # noqa: F811
    # the array tasks share the corpus the local study built (corpus.prefix)
    data = local_study[0] / "runs" / "data"
    spec = write_spec(tmp_path, "slurm_study",
                      corpus={"prefix": str(data / "corpus"), "tokenizer": str(data / "tokenizer"),
                              "diagnostics_sequences": 20})
    env = dict(slurm_cluster, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    array = Job("launch/study.sh", env, str(tmp_path / "array-%a.log"), args=[spec],
                sbatch_args=["--array=0-1", "--time=10", "--cpus-per-task=1"])
    report = Job("launch/study.sh", env, str(tmp_path / "report.log"), args=[spec, "--report-only"],
                 sbatch_args=[f"--dependency=afterany:{array.id}", "--time=5"])
    fields = report.finish(timeout=150)
    logs = "".join(open(tmp_path / f"array-{i}.log").read()[-2000:] for i in range(2)
                   if os.path.isfile(tmp_path / f"array-{i}.log"))
    assert fields.get("ExitCode") == "0:0", report.text()[-2000:] + logs
    for i, r in enumerate(RUNS):
        res = json.load(open(tmp_path / "runs" / r["name"] / "result.json"))
        assert res["final_valid_loss"] is not None
        assert f"array task {i} " in open(tmp_path / f"array-{i}.log").read()
    text = (tmp_path / "report.md").read_text()
    assert "2/2 runs finished" in text and (tmp_path / "figures" / "slurm_study_ratio.png").is_file()


def test_default_spec_runs_are_matched():
    from longcat_megatron.study.spec import counts, load_spec, run_model

    spec = load_spec(os.path.join(ROOT, "studies", "embedding_vs_experts.yaml"))
    sizes = {run.name: (run, run_model(spec, run)) for run in spec.runs}
    activated = {counts(cfg)["activated"] for run, cfg in sizes.values() if run.strategy != "per_layer"}
    assert max(activated) / min(activated) < 1.03, activated  # one activated size (routers' rows aside)
    # PLE / PLNE replace the dense MLPs' up projections by lookups: exactly those leave "activated"
    base = sizes["vanilla_e8"][1]
    ups = 2 * base.num_layers * base.hidden_size * base.ffn_hidden_size
    for name in ("ple", "plne_r0.35"):
        assert counts(sizes[name][1])["activated"] == counts(base)["activated"] - ups, name
    for run, cfg in sizes.values():
        c = counts(cfg)
        if run.target_ratio:
            assert abs(c["total"] / c["activated"] - run.target_ratio) / run.target_ratio < 0.015, run.name
        if cfg.ngram is not None and run.scale:  # solved ratios stay off integer multiples of V
            frac = cfg.ngram.ngram_vocab_size_ratio % 1
            assert 0.09 < frac < 0.91, (run.name, cfg.ngram.ngram_vocab_size_ratio)
    assert counts(sizes["ngram_x5"][1])["ngram"] / counts(sizes["ngram_x5"][1])["total"] > 0.5
    shapes = {(c.ngram.emb_neighbor_num, c.ngram.emb_split_num) for r, c in sizes.values() if r.strategy == "nk"}
    assert shapes == {(2, 1), (4, 2), (5, 3)}
    assert {c.ngram.amplification for r, c in sizes.values() if r.strategy == "amplification"} == {"sqrt", "layernorm"}
