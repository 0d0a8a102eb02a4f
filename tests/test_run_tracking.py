"""Watching and scoring a run: Weights & Biases (offline), the status curves, and lm-evaluation-harness.

One tiny LongCat model with the N-gram Embedding is trained on the tiny corpus in one gloo process
with TensorBoard and W&B (``WANDB_MODE=offline``; W&B's server address points at a local socket
that counts connections: none may arrive): 12 iterations and a stop, then a resume to 24.

* W&B: one run id, kept beside the checkpoints, for both starts; the first offline run file holds
  steps 1-12 and the resumed one 13-24 with the same metrics as TensorBoard (loss, LR, grad norm, tokens,
  throughput, memory, router statistics); the config is the resolved run config with the recipe
  labels; W&B's service process runs with the stop signals blocked.
* status: the PNG and the CSV of the curves.
* evaluate (lm_eval on the exported checkpoint, the task in tests/eval_tasks): scores written next to
  the checkpoint and logged to TensorBoard and W&B at iterations 12 and 24; the same model with its
  weights shuffled scores differently (and worse on the log-likelihood task).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.harness import run_distributed
from tests.train_utils import ROOT

CONFIG = os.path.join(ROOT, "configs", "tiny_longcat_ngram.yaml")
TASKS = os.path.join(ROOT, "tests", "eval_tasks")


class ConnectionCounter:
    """A local TCP socket standing in for every server W&B could contact; counts who connects."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.count, self._stop = 0, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.count += 1
            conn.close()

    def close(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def _train(overrides: list, log_path: str) -> dict:
    import contextlib

    from longcat_megatron.training.progress import note_recipe
    from tests.train_utils import run_training

    note_recipe([CONFIG], overrides)  # as `python -m longcat_megatron.train` does
    with open(log_path, "w") as f, contextlib.redirect_stdout(f):
        out = run_training(overrides, CONFIG)
    out.pop("weights")
    return out


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """The trained run: (checkpoint dir, tensorboard dir, training results, connection counter)."""
    from data_tools.preprocess import preprocess

    base = tmp_path_factory.mktemp("tracking")
    tok = os.path.join(tiny, "tokenizer")
    preprocess([os.path.join(tiny, "corpus.jsonl")], tok, str(base / "data" / "corpus"), workers=0, progress=False)
    ckpt, tb = base / "ckpt", base / "tensorboard"
    server = ConnectionCounter()
    env = {"WANDB_MODE": "offline", "WANDB_BASE_URL": server.url, "WANDB_SILENT": "true",
           "HTTP_PROXY": server.url, "HTTPS_PROXY": server.url, "WANDB_API_KEY": "x" * 40}
    overrides = [
        "model.vocab_size=512", "parallel.tensor=1", "parallel.sequence_parallel=false",
        f"data.paths=[{base / 'data' / 'corpus'}]", f"data.tokenizer={tok}", "data.mock=false",
        "train.train_iters=24", "train.global_batch_size=8", "train.micro_batch_size=8", "optimizer.lr=3e-3",
        "schedule.warmup_iters=1", f"checkpoint.save={ckpt}", "checkpoint.save_interval=12", "checkpoint.keep_last=0",
        f"logging.tensorboard_dir={tb}", "logging.wandb_project=longcat-test", "logging.log_interval=2"]
    first = run_distributed(_train, 1, overrides + ["train.exit_interval=12"], str(base / "train1.log"), env=env)[0]
    second = run_distributed(_train, 1, overrides, str(base / "train2.log"), env=env)[0]
    yield {"ckpt": ckpt, "tb": tb, "base": base, "first": first, "second": second, "server": server, "env": env,
           "overrides": overrides}
    server.close()


def wandb_records(path: str):
    """The records of an offline W&B run file (W&B's LevelDB-log format: 7-byte header, 32 KiB
    blocks of chunks with a 7-byte header each), as protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            pending = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            pending += chunk
        else:
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def offline_run(path: str) -> dict:
    """{id, config, history: {step: {key: value}}} of one offline run file."""
    out = {"history": {}, "config": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update({c.key: json.loads(c.value_json) for c in record.run.config.update})
        elif kind == "config":
            out["config"].update({c.key: json.loads(c.value_json) for c in record.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out["history"].setdefault(items.pop("_step"), {}).update(items)
    return out


def test_wandb_offline_run_resumes_the_same_id_with_tensorboard_metrics(run):
    from longcat_megatron.status import read_scalars

    ckpt = run["ckpt"]
    assert run["first"]["iteration"] == 12 and run["second"]["resumed_from"] == 12
    run_id = (ckpt / "wandb_run_id.txt").read_text().strip()
    assert f"[wandb] started run {run_id}" in (run["base"] / "train1.log").read_text()
    assert f"[wandb] resumed run {run_id}" in (run["base"] / "train2.log").read_text()
    files = sorted(glob.glob(str(ckpt / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime)
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files), files
    first, second = offline_run(files[0]), offline_run(files[1])
    assert first["id"] == second["id"] == run_id
    assert sorted(first["history"]) == list(range(1, 13)) and sorted(second["history"]) == list(range(13, 25))
    history = {**first["history"], **second["history"]}
    tensorboard = read_scalars(str(run["tb"]))
    assert {t for t in tensorboard} == {k for h in history.values() for k in h if not k.startswith("_")}
    for tag in ("loss", "lr", "grad_norm", "tokens", "throughput/tokens_per_s", "throughput/peak_mem_gb",
                "moe/layer0/ffn_experts_per_token", "moe/layer1/load_max_over_mean", "moe/layer0/router_entropy"):
        steps, values, _ = tensorboard[tag]
        assert [history[s][tag] for s in steps] == pytest.approx(values, rel=1e-6), tag
    losses = {**run["first"]["losses"], **run["second"]["losses"]}
    assert [history[i]["loss"] for i in range(1, 25)] == pytest.approx([losses[i] for i in range(1, 25)], rel=1e-6)
    config = first["config"]
    assert config["model"]["ngram"]["emb_neighbor_num"] == 3 and config["checkpoint"]["save"] == str(ckpt)
    assert config["logging"]["wandb_project"] == "longcat-test" and config["launch"]["world_size"] == 1
    assert config["recipe"]["files"] == [CONFIG] and "model.ngram.eos_token_id" in config["recipe"]["published"]
    assert run["server"].count == 0  # offline: nothing contacted


def test_wandb_service_survives_sigusr1_and_its_loss_never_stops_training(tmp_path, monkeypatch, capsys):
    """SLURM signals every process of the job step: W&B's service keeps running through a SIGUSR1
    (the ranks save then); a SIGTERM ends it (Go cannot block SIGTERM), and logging then stops with
    one message instead of raising into the training loop."""
    import signal
    import time

    import psutil

    from longcat_megatron.training.progress import WandbRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # wandb.init sets it (its service's address): undone after
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    wb = WandbRun("p", directory=str(tmp_path), id_file=str(tmp_path / "id"))
    service = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and "wandb-core" in " ".join(p.cmdline())]
    assert len(service) == 1
    alive = lambda: service[0].is_running() and service[0].status() != psutil.STATUS_ZOMBIE  # noqa: E731
    wb.log({"loss": 1.0}, step=1)
    os.kill(service[0].pid, signal.SIGUSR1)
    time.sleep(0.3)
    assert alive()
    wb.log({"loss": 0.9}, step=2)
    os.kill(service[0].pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()
    for step in (3, 4):
        wb.log({"loss": 0.8}, step=step)  # must not raise
    # W&B records imports of ML libraries (a hook on "optuna", "sklearn", ...): with its service gone
    # such an import (e.g. a lazy one during a save) must not raise either
    (tmp_path / "optuna.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import optuna  # noqa: F401
    sys.modules.pop("optuna", None)
    print("prints still work")
    wb.finish()
    captured = capsys.readouterr()
    assert captured.err.count("[wandb] logging stopped") == 1 and "prints still work" in captured.out
    assert (tmp_path / "id").read_text().strip() == wb.id
    import wandb

    try:  # the service is gone: tear the connection down now, or wandb's atexit hook prints a
        wandb.teardown()  # traceback when pytest exits
    except (ConnectionError, OSError):
        pass


CANNOT_START = """
import sys
from longcat_megatron.errors import UserInputError
from longcat_megatron.training.progress import WandbRun
tmp = sys.argv[1]
try:
    WandbRun("p", directory=tmp, id_file=tmp + "/new_id")
    sys.exit("a first start without W&B did not stop")
except UserInputError as exc:
    assert "wandb login" in str(exc) and "WANDB_MODE=offline" in str(exc), exc
import os
assert not os.path.exists(tmp + "/new_id")  # no run was made: the next start is a first start again
open(tmp + "/id", "w").write("abc12345\\n")
wb = WandbRun("p", directory=tmp, id_file=tmp + "/id")
assert wb.run is None and wb.resumed
wb.log({"loss": 1.0}, step=1)
wb.finish()
"""


def test_wandb_that_cannot_start_stops_a_first_start_but_not_a_resume(tmp_path):
    """Not logged in (online mode, no API key): the first start of a run stops with what to do; a
    requeue/resume of a run that already logs to W&B goes on without it (a W&B outage must not keep a
    requeued job down). In a fresh process: W&B reads its settings once per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_SERVICE")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), PYTHONPATH=ROOT,
               WANDB_BASE_URL="http://127.0.0.1:9")
    res = subprocess.run([sys.executable, "-c", CANNOT_START, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "could not resume run abc12345; going on without W&B" in res.stderr


def test_status_writes_curves_png_and_csv(run):
    import csv

    from longcat_megatron.status import main as status_main

    assert status_main([str(run["ckpt"])]) == 0
    png = (run["ckpt"] / "logs" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    rows = list(csv.DictReader(open(run["ckpt"] / "logs" / "curves.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 25))
    assert float(rows[-1]["loss"]) == pytest.approx(run["second"]["losses"][24], rel=1e-6)
    assert rows[0]["moe/layer0/load_max_over_mean"] and float(rows[-1]["tokens"]) == 24 * 8 * 64


EVAL_DRIVER = """
import sys
from longcat_megatron.evaluate import ensure_export, main
from tests.test_run_tracking import shuffle_weights
ckpt, tmp, tasks, include = sys.argv[1:5]
common = ["--tasks", tasks, "--include-path", include, "--no-default-tasks", "--batch-size", "8", "--device", "cpu"]
# the command an operator runs (python -m longcat_megatron.evaluate ...): every committed iteration
assert main(["--load", ckpt, "--pending", *common]) == 0
# the same model with its weights shuffled, in this process (the harness's imports are paid once)
hf, _ = ensure_export(ckpt, 24, tmp + "/hf")
assert main(["--load", ckpt, "--iteration", "24", "--export-dir", shuffle_weights(hf, tmp + "/hf_shuffled"),
             "--scores-dir", tmp + "/shuffled", "--no-log", *common]) == 0
"""


def test_evaluate_scores_the_checkpoint_with_lm_eval(run, tmp_path):
    if os.environ.get("LONGCAT_REQUIRE_LM_EVAL") != "1":  # CI (tests/run.sh) installs it and requires it
        pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (bash tests/setup_eval.sh)")
    ckpt = run["ckpt"]
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, **run["env"], "PYTHONPATH": ROOT,
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", EVAL_DRIVER, str(ckpt), str(tmp_path),
                          "longcat_tiny_mc,longcat_tiny_ppl", TASKS],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    scores = {it: json.load(open(ckpt / "eval" / f"iter_{it:07d}" / "scores.json")) for it in (12, 24)}
    for it, rec in scores.items():
        assert rec["iteration"] == it and set(rec["scores"]) == {"longcat_tiny_mc", "longcat_tiny_ppl"}
        assert 0 <= rec["scores"]["longcat_tiny_mc"]["acc"] <= 1 and rec["scores"]["longcat_tiny_ppl"]["bits_per_byte"] > 0
        assert not os.path.exists(rec["export"])  # made for the evaluation, removed after
    assert f"[evaluate] iteration 24: longcat_tiny_mc acc=" in res.stdout
    csv_rows = (ckpt / "eval" / "scores.csv").read_text().splitlines()
    assert csv_rows[0] == "iteration,task,metric,value" and "24,longcat_tiny_ppl,bits_per_byte," in "\n".join(csv_rows)
    from longcat_megatron.status import read_scalars

    tb = read_scalars(str(run["tb"] / "eval"))
    assert tb["eval/longcat_tiny_mc/acc"][0] == [12, 24]
    assert tb["eval/longcat_tiny_ppl/bits_per_byte"][1][1] == pytest.approx(
        scores[24]["scores"]["longcat_tiny_ppl"]["bits_per_byte"], rel=1e-6)
    eval_id = (ckpt / "wandb_eval_run_id.txt").read_text().strip()
    history = {}
    for f in glob.glob(str(ckpt / "wandb" / "offline-run-*" / f"run-{eval_id}.wandb")):
        for h in offline_run(f)["history"].values():
            history[h["iteration"]] = h
    assert sorted(history) == [12, 24]
    assert history[24]["eval/longcat_tiny_mc/acc"] == scores[24]["scores"]["longcat_tiny_mc"]["acc"]
    assert run["server"].count == 0

    # the same model with every weight tensor shuffled scores differently, and worse
    trained = scores[24]["scores"]
    other = json.load(open(tmp_path / "shuffled" / "iter_0000024" / "scores.json"))["scores"]
    assert other["longcat_tiny_mc"] != trained["longcat_tiny_mc"]
    assert other["longcat_tiny_ppl"]["bits_per_byte"] > trained["longcat_tiny_ppl"]["bits_per_byte"] + 0.1
    assert os.path.isdir(tmp_path / "hf_shuffled")  # an export named with --export-dir is kept


def shuffle_weights(src: str, dst: str) -> str:
    """A copy of an HF directory whose every floating tensor has its elements permuted (same
    values, no structure)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("longcat_export.json"))  # no longer that checkpoint
    gen = torch.Generator().manual_seed(0)
    for path in glob.glob(os.path.join(dst, "*.safetensors")):
        tensors = load_file(path)
        for k, t in tensors.items():
            if t.is_floating_point() and t.numel() > 1:
                flat = t.flatten()
                tensors[k] = flat[torch.randperm(flat.numel(), generator=gen)].reshape(t.shape).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return dst
