"""Running one study run: corpus preparation, the training subprocess, the result file.

Layout under ``spec.runs_dir``: ``data/`` (the tokenized corpus when the spec builds the tiny one),
and per run ``<name>/config.yaml`` (the generated run config), ``train.log`` (all attempts,
appended), ``checkpoints/``, ``tensorboard/``, ``runs.log`` (one line per attempt: start/end, exit
code) and ``result.json``, written last and atomically: a run with a result for the same config
fingerprint is not trained again. An interrupted run resumes from its last checkpoint; one whose
config changed since (another fingerprint) is restarted from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

import yaml

from longcat_megatron.errors import UserInputError
from longcat_megatron.study.spec import RunSpec, Spec, counts, fingerprint, run_config_tree, run_model

RESULT = "result.json"
# Exits after which the same command resumes from the last checkpoint: 75 stopped early after saving
# (signal, exit-duration limit), 76 hang watchdog; a negative code is a signal (killed).
RESUMABLE = (75, 76)


class StudyRunError(UserInputError):
    """A run failed; the message names it and its log."""


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _py(module: str, *args: str) -> str:
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise StudyRunError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n"
                            f"{(out.stdout + out.stderr)[-2000:]}")
    return out.stdout


def prepare_corpus(spec: Spec) -> tuple[str, str]:
    """(dataset prefix, tokenizer dir): the spec's own, or the tiny corpus built once (locked, so
    concurrent array tasks build it once)."""
    if spec.corpus.prefix:
        for p in (spec.corpus.prefix + ".bin", spec.corpus.prefix + ".idx"):
            if not os.path.exists(p):
                raise StudyRunError(f"corpus.prefix: {p} not found")
        return spec.corpus.prefix, spec.corpus.tokenizer
    data = os.path.join(spec.runs_dir, "data")
    prefix, tok = os.path.join(data, "corpus"), os.path.join(data, "tokenizer")
    vocab = int(spec.base["model"]["vocab_size"])
    with _locked(os.path.join(spec.runs_dir, ".corpus.lock")):
        _py("data_tools.tiny_corpus", "--out", data, "--vocab-size", str(vocab),
            "--max-mb", str(spec.corpus.tiny_max_mb))
        stamp = os.path.join(data, ".tokenized")
        want = open(os.path.join(data, ".complete")).read()
        if not (os.path.isfile(stamp) and open(stamp).read() == want and os.path.isfile(prefix + ".idx")):
            _py("data_tools.preprocess", "--input", os.path.join(data, "corpus.jsonl"), "--tokenizer", tok,
                "--output-prefix", prefix, "--workers", "0", "--quiet")
            with open(stamp, "w") as f:
                f.write(want)
    return prefix, tok


def run_dir(spec: Spec, run: RunSpec) -> str:
    return os.path.join(spec.runs_dir, run.name)


def read_result(spec: Spec, run: RunSpec) -> Optional[dict]:
    path = os.path.join(run_dir(spec, run), RESULT)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _atomic_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _log_line(rdir: str, text: str) -> None:
    with open(os.path.join(rdir, "runs.log"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def train_command(spec: Spec, config: str) -> list[str]:
    if spec.launch.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={spec.launch.nproc}", "-m", "longcat_megatron.train", "--config", config]
    return [sys.executable, "-m", "longcat_megatron.train", "--config", config]


def collision_stats(prefix: str, cfg, max_sequences: int) -> Optional[dict]:
    """Hash-collision statistics of the run's N-gram tables over the corpus (data_tools, as a
    subprocess: longcat_megatron does not import data_tools)."""
    if cfg.ngram is None:
        return None
    ng = cfg.ngram
    out = _py("data_tools.ngram_diagnostics", "--data", prefix, "--vocab-size", str(cfg.vocab_size),
              "--ratio", repr(float(ng.ngram_vocab_size_ratio)), "--n", str(ng.emb_neighbor_num),
              "--k", str(ng.emb_split_num), "--eos", str(-1 if ng.eos_token_id is None else ng.eos_token_id),
              "--max-sequences", str(max_sequences), "--json")
    tables = json.loads(out)
    distinct = sum(t["distinct_ngrams"] for t in tables)
    colliding = sum(t["colliding_ngrams"] for t in tables)
    return {"collision_rate": colliding / max(1, distinct),
            "max_table_collision_rate": max(t["collision_fraction"] for t in tables),
            "tables": [{k: t[k] for k in ("table", "order", "split", "rows", "distinct_ngrams",
                                           "colliding_ngrams", "collision_fraction")} for t in tables]}


def _curves(tb_dir: str) -> dict:
    from longcat_megatron.status import read_scalars

    scalars = read_scalars(tb_dir) if os.path.isdir(tb_dir) else {}
    return {tag: [list(scalars[tag][0]), list(scalars[tag][1])]
            for tag in ("loss", "valid/loss") if tag in scalars}


def execute(spec: Spec, run: RunSpec, *, echo=print) -> dict:
    """Train ``run`` unless finished; returns its result."""
    rdir = run_dir(spec, run)
    os.makedirs(rdir, exist_ok=True)
    prefix, tok = prepare_corpus(spec)
    tree = run_config_tree(spec, run, rdir, prefix, tok)
    overrides = list(spec.launch.overrides) + list(run.overrides)
    fp = fingerprint(tree, overrides)
    done = read_result(spec, run)
    if done is not None and done.get("fingerprint") == fp:
        echo(f"[study] {run.name}: finished earlier (valid loss {done.get('final_valid_loss')}), skipped")
        return done
    config = os.path.join(rdir, "config.yaml")
    previous = None
    if os.path.isfile(config):
        previous = (yaml.safe_load(open(config)) or {}).get("_study_fingerprint")
    if previous != fp:  # new run, or its config changed: start clean
        for sub in ("checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(rdir, sub), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(rdir, RESULT))
        if previous is not None:
            _log_line(rdir, f"config changed ({previous} -> {fp}): restarted from scratch")
    with open(config, "w") as f:
        yaml.safe_dump(dict(tree, _study_fingerprint=fp), f, sort_keys=False)
    # the trainer rejects unknown sections: give it the config without the fingerprint
    train_cfg = os.path.join(rdir, "train_config.yaml")
    with open(train_cfg, "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
    cmd = train_command(spec, train_cfg) + overrides
    rc, started = None, time.time()
    env = dict(os.environ)
    if spec.launch.nproc == 1:
        # one local rank of its own: not srun's task (SLURM_PROCID would make the trainer derive the
        # port from the job id, shared by concurrent array tasks on one node), a free port
        from longcat_megatron.runtime import free_port

        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for attempt in range(1, spec.launch.max_attempts + 1):
        echo(f"[study] {run.name}: training (attempt {attempt}): {' '.join(cmd)}")
        _log_line(rdir, f"start attempt {attempt} fingerprint {fp}")
        with open(os.path.join(rdir, "train.log"), "a") as logf:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
        _log_line(rdir, f"end attempt {attempt} exit {rc}")
        if rc not in RESUMABLE and rc >= 0:
            break  # done, or an error that a restart would repeat
    if rc != 0:
        raise StudyRunError(f"run {run.name} failed (exit {rc}); log: {os.path.join(rdir, 'train.log')}")
    cfg = run_model(spec, run)
    c = counts(cfg)
    curves = _curves(os.path.join(rdir, "tensorboard"))
    train_curve, valid_curve = curves.get("loss", [[], []]), curves.get("valid/loss", [[], []])
    tail = train_curve[1][-max(1, len(train_curve[1]) // 10):]
    result = {
        "name": run.name, "strategy": run.strategy, "fingerprint": fp,
        "total": c["total"], "activated": c["activated"], "ngram_params": c["ngram"],
        "ratio": c["total"] / c["activated"], "ngram_share": c["ngram"] / c["total"],
        "num_experts": cfg.num_experts,
        "ngram": None if cfg.ngram is None else {
            "N": cfg.ngram.emb_neighbor_num, "K": cfg.ngram.emb_split_num,
            "amplification": cfg.ngram.amplification, "ratio": cfg.ngram.ngram_vocab_size_ratio},
        "final_train_loss": train_curve[1][-1] if train_curve[1] else None,
        "final_train_loss_mean": sum(tail) / len(tail) if tail else None,  # last 10% of the logged steps
        "final_valid_loss": valid_curve[1][-1] if valid_curve[1] else None,
        "train_curve": train_curve, "valid_curve": valid_curve,
        "collisions": collision_stats(prefix, cfg, spec.corpus.diagnostics_sequences),
        "seconds": time.time() - started,
        "command": cmd,
    }
    _atomic_json(os.path.join(rdir, RESULT), result)
    _log_line(rdir, "result written")
    echo(f"[study] {run.name}: done in {result['seconds']:.0f}s, valid loss {result['final_valid_loss']}")
    return result
