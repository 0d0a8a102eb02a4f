"""Benchmark scores of a checkpoint with EleutherAI's lm-evaluation-harness, in one command.

    python -m longcat_megatron.evaluate --load RUN_DIR [--iteration N | --pending [--watch S]] \\
        --tasks hellaswag,arc_easy [--num-fewshot K] [--limit N] [--batch-size B] [--device cuda]

For each checkpoint (the latest committed one, ``--iteration N``, or with ``--pending`` every
committed iteration that has no scores for these tasks yet):

1. **export** it to Hugging Face (``ckpt_convert.to_hf``, one CPU process, any training layout) into
   ``RUN_DIR/hf/iter_NNNNNNN`` with the tokenizer (``--tokenizer``, default the run's
   ``data.tokenizer``), or reuse that export when it was made from this very checkpoint (its
   ``longcat_export.json`` records the checkpoint's ``checksums.json`` digest); ``--export-dir`` names
   an existing HF directory to use as it is;
2. **evaluate** it with ``lm_eval.simple_evaluate`` through the harness's Hugging Face model
   (``model="hf"``, ``trust_remote_code=True``: the N-gram model's code ships with the export);
   ``--include-path DIR`` adds task YAMLs of your own (``--no-default-tasks``: only those);
3. **write** the scores next to the checkpoints: ``RUN_DIR/eval/iter_NNNNNNN/scores.json`` (the
   metrics), ``results.json`` (the harness's full results) and ``RUN_DIR/eval/scores.csv`` (every
   iteration: ``iteration,task,metric,value``); and log them as ``eval/TASK/METRIC`` at that
   iteration to TensorBoard (``TENSORBOARD_DIR/eval``, the run's ``logging.tensorboard_dir`` or
   ``RUN_DIR/tensorboard``) and, when the run logs to W&B (``logging.wandb_project``), to a W&B run
   of its own (``job_type=eval``, grouped with the training run, x axis ``iteration``; its id kept
   in ``RUN_DIR/wandb_eval_run_id.txt``): W&B takes one writer per run and only increasing steps,
   and the evaluation of iteration N usually runs while training is already past N.

A newly made export is deleted after scoring unless ``--keep-export`` (a large model's export is as
big as its weights); an export that was there before, or one into ``--export-dir``, is kept. Install the harness with ``pip
install .[eval]``. On a cluster, evaluate after each save with ``launch/evaluate.sh``
(docs/operations.md, "Evaluating checkpoints"). Exit codes: 0, 2 bad input (the message says why).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Optional

from longcat_megatron.errors import UserInputError

EXPORT_STAMP = "longcat_export.json"
SCORES = "scores.json"
WANDB_EVAL_ID_FILE = "wandb_eval_run_id.txt"
_SKIP_KEYS = {"alias", "name", "sample_len", "sample_count"}


class EvaluateError(UserInputError):
    """Bad input for the evaluation; the message names the fix."""


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _checkpoint_digest(iter_dir: str) -> str:
    """What identifies a checkpoint's content: the SHA-256 of its checksums.json (itself the digest
    of every file), else of its metadata files."""
    h = hashlib.sha256()
    for name in ("checksums.json", "metadata.json", "common.pt"):
        path = os.path.join(iter_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + f.read())
            if name == "checksums.json":
                break
    return h.hexdigest()


def run_config_of(iter_dir: str) -> dict:
    from longcat_megatron.status import _run_config

    return _run_config(iter_dir)


def committed_iterations(run_dir: str) -> list[int]:
    """Complete checkpoints at or below the tracker's iteration (the ones a resume could use)."""
    from longcat_megatron.training.checkpoint_integrity import is_complete
    from longcat_megatron.training.checkpointing import iteration_dir, list_iterations, read_tracker

    latest = read_tracker(run_dir)
    if latest is None:
        return []
    return [i for i in list_iterations(run_dir) if i <= latest and is_complete(iteration_dir(run_dir, i))]


def ensure_export(run_dir: str, iteration: int, export_dir: Optional[str] = None,
                  tokenizer: Optional[str] = None) -> tuple[str, bool]:
    """(HF directory of ``iteration``, whether it existed already): a reused or a fresh export."""
    from ckpt_convert import ConversionError
    from ckpt_convert.to_hf import convert

    iter_dir = os.path.join(run_dir, _iter_name(iteration))
    if export_dir and os.path.isfile(os.path.join(export_dir, "config.json")) and \
            not os.path.isfile(os.path.join(export_dir, EXPORT_STAMP)):
        return export_dir, True  # an HF directory of the operator's own: used as it is
    target = export_dir or os.path.join(run_dir, "hf", _iter_name(iteration))
    digest = _checkpoint_digest(iter_dir)
    try:
        stamp = json.load(open(os.path.join(target, EXPORT_STAMP)))
    except (OSError, ValueError):
        stamp = None
    if stamp and stamp.get("checkpoint_digest") == digest and os.path.isfile(os.path.join(target, "config.json")):
        return target, True
    tok = tokenizer or (run_config_of(iter_dir).get("data") or {}).get("tokenizer")
    if not tok or not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        raise EvaluateError(
            f"no tokenizer for the export of {iter_dir}: the run's data.tokenizer is "
            f"{tok or 'not set'}; pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    eos = (run_config_of(iter_dir).get("data") or {}).get("eod_token_id", 2)
    print(f"[evaluate] exporting {iter_dir} -> {target}", flush=True)
    try:
        convert(run_dir, target, iteration=iteration, tokenizer=tok, overwrite=True, progress=False,
                eos_token_id=int(eos))
    except ConversionError as exc:
        raise EvaluateError(f"cannot export {iter_dir}: {exc}") from None
    with open(os.path.join(target, EXPORT_STAMP), "w") as f:
        json.dump({"checkpoint": os.path.abspath(iter_dir), "iteration": iteration,
                   "checkpoint_digest": digest}, f, indent=1)
    return target, False


def run_harness(hf_dir: str, tasks: list[str], *, num_fewshot: Optional[int] = None,
                limit: Optional[float] = None, batch_size="auto", device: Optional[str] = None,
                dtype: str = "auto", include_path: Optional[str] = None, default_tasks: bool = True,
                model_args: Optional[dict] = None, seed: int = 1234) -> dict:
    """``lm_eval.simple_evaluate`` on an HF directory through the harness's HF model; its results."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvaluateError(f"lm-evaluation-harness is not installed ({exc}): pip install .[eval] "
                            "(or pip install 'lm_eval[hf]')") from None
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    args = {"pretrained": os.path.abspath(hf_dir), "trust_remote_code": True, "dtype": dtype, **(model_args or {})}
    if not args.get("parallelize"):
        args["device"] = device
    manager = TaskManager(include_path=include_path, include_defaults=default_tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise EvaluateError(f"unknown lm_eval task(s) {unknown}: not in the harness's task library{where} "
                            "(`lm_eval ls tasks` lists them; --include-path DIR adds your own task YAMLs)")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
        batch_size=batch_size, task_manager=manager, log_samples=False, verbosity="WARNING",
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # a non-zero rank of a multi-process harness run
        return {}
    return results


def scores_of(results: dict) -> dict:
    """{task: {metric: value}} from the harness's results: numbers only (``acc``, ``acc_stderr``,
    ...; a metric of a named filter is ``METRIC/FILTER``)."""
    out: dict = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in _SKIP_KEYS or isinstance(value, (bool, str)):
                continue
            try:
                value = float(value)  # numpy scalars too
            except (TypeError, ValueError):
                continue
            out.setdefault(task, {})[name if filt in ("", "none") else f"{name}/{filt}"] = value
    return out


def write_scores(scores_dir: str, iteration: int, record: dict, results: dict) -> str:
    """``scores_dir/iter_N/{scores,results}.json`` (atomically) and ``scores_dir/scores.csv`` rebuilt
    from every iteration's scores; returns the scores.json path."""
    out = os.path.join(scores_dir, _iter_name(iteration))
    os.makedirs(out, exist_ok=True)
    for name, data in ((SCORES, record), ("results.json", results)):
        tmp = os.path.join(out, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, os.path.join(out, name))
    rows = []
    for path in sorted(glob.glob(os.path.join(scores_dir, "iter_*", SCORES))):
        rec = json.load(open(path))
        for task, metrics in sorted(rec["scores"].items()):
            rows += [(rec["iteration"], task, metric, value) for metric, value in sorted(metrics.items())]
    tmp = os.path.join(scores_dir, f".scores.csv.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "task", "metric", "value"])
        w.writerows(sorted(rows, key=lambda r: (r[0], r[1], r[2])))
    os.replace(tmp, os.path.join(scores_dir, "scores.csv"))
    return os.path.join(out, SCORES)


def log_scores(run_dir: str, iteration: int, scores: dict, cfg: dict, *, tasks: list[str]) -> list[str]:
    """``eval/TASK/METRIC`` at ``iteration`` to TensorBoard and (if the run uses it) W&B; where it went."""
    flat = {f"eval/{task}/{metric}": v for task, metrics in scores.items() for metric, v in metrics.items()
            if not metric.endswith("_stderr")}
    where = []
    log = cfg.get("logging") or {}
    tb = log.get("tensorboard_dir") or os.path.join(run_dir, "tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=os.path.join(tb, "eval"))
    for name, value in flat.items():
        writer.add_scalar(name, value, iteration)
    writer.close()
    where.append(f"TensorBoard {os.path.join(tb, 'eval')}")
    if log.get("wandb_project"):
        from longcat_megatron.training.progress import WandbRun, _read_id, wandb_settings

        project, entity, name, _, _ = wandb_settings(cfg)
        directory = log.get("wandb_dir") or run_dir  # the run directory as it is now (it may have moved)
        train_id = _read_id(os.path.join(run_dir, "wandb_run_id.txt"))
        run = WandbRun(project, entity=entity, name=f"{name}-eval" if name else None, directory=directory,
                       id_file=os.path.join(run_dir, WANDB_EVAL_ID_FILE), job_type="eval",
                       group=train_id, step_metric="iteration",
                       config={"run_dir": os.path.abspath(run_dir), "training_run_id": train_id, "tasks": tasks})
        run.log(flat, step=iteration)
        run.finish()
        where.append(f"W&B run {run.id} (group {train_id})")
    return where


def evaluate_iteration(run_dir: str, iteration: int, tasks: list[str], *, export_dir: Optional[str] = None,
                       tokenizer: Optional[str] = None, keep_export: bool = False,
                       scores_dir: Optional[str] = None, log: bool = True, **harness) -> dict:
    """Export (or reuse), evaluate, write and log one checkpoint; returns its scores record."""
    start = time.monotonic()
    hf_dir, existed = ensure_export(run_dir, iteration, export_dir, tokenizer)
    try:
        results = run_harness(hf_dir, tasks, **harness)
    finally:
        if not existed and not keep_export and not export_dir:  # an export the operator named is kept
            shutil.rmtree(hf_dir, ignore_errors=True)
    if not results:
        return {}
    import lm_eval

    scores = scores_of(results)
    record = {"iteration": iteration, "checkpoint": os.path.abspath(os.path.join(run_dir, _iter_name(iteration))),
              "tasks": tasks, "scores": scores, "export": os.path.abspath(hf_dir), "export_kept": existed or keep_export or bool(export_dir),
              "lm_eval_version": getattr(lm_eval, "__version__", "?"),
              "settings": {k: v for k, v in harness.items() if k != "model_args"} | {"model_args": harness.get("model_args")},
              "seconds": round(time.monotonic() - start, 1),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = write_scores(scores_dir or os.path.join(run_dir, "eval"), iteration, record,
                        {k: results.get(k) for k in ("results", "groups", "configs", "versions", "n-shot",
                                                     "higher_is_better", "n-samples", "config")})
    where = log_scores(run_dir, iteration, scores, run_config_of(os.path.join(run_dir, _iter_name(iteration))),
                       tasks=tasks) if log else []
    print(f"[evaluate] iteration {iteration}: " + "; ".join(
        f"{t} " + " ".join(f"{m}={v:.4f}" for m, v in ms.items() if not m.endswith("_stderr"))
        for t, ms in scores.items()), flush=True)
    print(f"[evaluate] scores: {path}" + (f"; logged to {', '.join(where)}" if where else ""), flush=True)
    return record


def pending_iterations(run_dir: str, tasks: list[str], scores_dir: Optional[str] = None) -> list[int]:
    """Committed iterations without scores for all of ``tasks``."""
    scores_dir = scores_dir or os.path.join(run_dir, "eval")
    todo = []
    for it in committed_iterations(run_dir):
        try:
            done = set(json.load(open(os.path.join(scores_dir, _iter_name(it), SCORES)))["tasks"])
        except (OSError, ValueError, KeyError):
            done = set()
        if not set(tasks) <= done:
            todo.append(it)
    return todo


def _parse_model_args(text: Optional[str]) -> dict:
    out = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_megatron.evaluate",
                                description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring and docs/operations.md.")
    p.add_argument("--load", required=True, help="the run's checkpoint directory (checkpoint.save / CKPT_DIR)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, help="evaluate this iteration (default: the latest committed)")
    which.add_argument("--pending", action="store_true",
                       help="evaluate every committed iteration that has no scores for these tasks yet")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="with --pending: keep looking for new checkpoints every SECONDS until the run's last "
                        "iteration (train.train_iters) is scored")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval tasks or groups (e.g. hellaswag,arc_easy)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1); for quick checks")
    p.add_argument("--batch-size", default="auto", help="lm_eval batch size (default auto)")
    p.add_argument("--device", default=None, help="cuda, cuda:0, cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype for the harness (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--model-args", default=None,
                   help="extra HF model arguments for lm_eval, e.g. parallelize=True (a model over this node's GPUs)")
    p.add_argument("--include-path", default=None, help="directory of your own lm_eval task YAMLs")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only the tasks under --include-path (skips indexing the harness's task library)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the export (default: data.tokenizer)")
    p.add_argument("--export-dir", default=None, help="use this HF directory (export into it if it does not exist)")
    p.add_argument("--keep-export", action="store_true", help="keep a newly made export (default: delete it after)")
    p.add_argument("--scores-dir", default=None, help="where the scores go (default: RUN_DIR/eval)")
    p.add_argument("--no-log", action="store_true", help="do not log to TensorBoard / W&B")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    harness = dict(num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=int(args.batch_size) if args.batch_size.isdigit() else args.batch_size,
                   device=args.device, dtype=args.dtype, include_path=args.include_path,
                   default_tasks=not args.no_default_tasks, model_args=_parse_model_args(args.model_args),
                   seed=args.seed)
    common = dict(export_dir=args.export_dir, tokenizer=args.tokenizer, keep_export=args.keep_export,
                  scores_dir=args.scores_dir, log=not args.no_log, **harness)
    try:
        from longcat_megatron.runtime import silence_known_warnings

        silence_known_warnings()
        if not os.path.isdir(args.load):
            raise EvaluateError(f"--load '{args.load}' is not a directory (pass the run's checkpoint.save)")
        if args.pending and args.export_dir:
            raise EvaluateError("--export-dir names one checkpoint's export: use it with --iteration N (or "
                                "none), not with --pending (each iteration gets RUN_DIR/hf/iter_N)")
        if not args.pending:
            from longcat_megatron.training.checkpointing import read_tracker

            it = args.iteration if args.iteration is not None else read_tracker(args.load)
            if it is None:
                raise EvaluateError(f"'{args.load}' has no committed checkpoint yet (no tracker file)")
            if it not in committed_iterations(args.load):
                raise EvaluateError(f"iteration {it} of '{args.load}' is not a complete committed checkpoint; "
                                    f"complete ones: {committed_iterations(args.load) or 'none'}")
            evaluate_iteration(args.load, it, tasks, **common)
            return 0
        while True:
            todo = pending_iterations(args.load, tasks, args.scores_dir)
            for it in todo:
                try:
                    evaluate_iteration(args.load, it, tasks, **common)
                except EvaluateError as exc:
                    if it in committed_iterations(args.load):
                        raise
                    # retention (checkpoint.keep_last) removed it meanwhile: go on with the others
                    print(f"[evaluate] iteration {it} was removed while being evaluated (checkpoint.keep_last); "
                          f"skipped: {exc}", flush=True)
            if not args.watch:
                if not todo:
                    print(f"[evaluate] nothing pending in {args.load} for {','.join(tasks)}")
                return 0
            done = committed_iterations(args.load)
            last = (run_config_of(os.path.join(args.load, _iter_name(done[-1]))).get("train") or {}).get(
                "train_iters") if done else None
            if done and last is not None and done[-1] >= last and not pending_iterations(args.load, tasks,
                                                                                           args.scores_dir):
                print(f"[evaluate] iteration {done[-1]} (the last, train.train_iters) is scored: done")
                return 0
            time.sleep(args.watch)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
