"""Human-readable progress lines, TensorBoard scalars and Weights & Biases (written by one rank only).

The line: iteration, loss, LR, grad norm, tokens so far, tokens/s, TFLOP/s per GPU (from the
model's FLOP count, :mod:`longcat_megatron.model.flops`), MFU (when the GPU's peak is known or
``logging.peak_tflops`` is set), peak memory of this rank, s/it, ETA, then the model's own
``progress/*`` figures.

Every scalar that goes to TensorBoard also goes to W&B (:class:`WandbRun`, with
``logging.wandb_project``) at the same step: loss, LR, grad norm, tokens, ``throughput/*``
(tokens/s, TFLOP/s, MFU, peak memory), the model's metrics (``moe/layerN/*`` router statistics:
experts per token, load min/max over mean, router entropy, LB loss; MTP and z-loss; ``progress/*``)
and ``valid/loss``. The W&B run's config is the resolved run config plus the recipe's labels
(published / guessed / cluster values, :func:`note_recipe`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, is_dataclass
from typing import Callable, Optional

from longcat_megatron.errors import UserInputError

WANDB_ID_FILE = "wandb_run_id.txt"  # in checkpoint.save: the W&B run this directory's run logs to
_RECIPE: dict = {}


def note_recipe(files: list, overrides: list = ()) -> None:
    """The config/stage files (and command-line overrides) the run was made from, for the W&B config's
    ``recipe`` labels (``python -m longcat_megatron.train`` calls this)."""
    _RECIPE.clear()
    _RECIPE.update(files=[f for f in files if f], overrides=list(overrides))


def recipe_labels() -> dict:
    """``{files, overrides, published: {key: value}, guess: {key: {value, why}}, cluster: {...}}`` of
    the files given to :func:`note_recipe` (empty when none were)."""
    if not _RECIPE.get("files"):
        return {}
    from longcat_megatron.recipe import labelled_values

    out: dict = {"files": [os.path.abspath(f) for f in _RECIPE["files"]], "overrides": _RECIPE["overrides"],
                 "published": {}, "guess": {}, "cluster": {}}
    for path in _RECIPE["files"]:
        try:
            items = labelled_values(path)
        except OSError:
            continue
        for item in items:
            out[item.kind][item.key] = item.value if item.kind == "published" else {"value": item.value,
                                                                                    "why": item.why}
    return out


def wandb_settings(run_config) -> tuple:
    """(project, entity, name, directory, id file) from a RunConfig (or its dict)."""
    cfg = asdict(run_config) if is_dataclass(run_config) else dict(run_config)
    log, save = cfg.get("logging") or {}, (cfg.get("checkpoint") or {}).get("save")
    name = log.get("wandb_name") or (os.path.basename(os.path.normpath(save)) if save else None)
    directory = log.get("wandb_dir") or save or os.getcwd()
    return (log.get("wandb_project"), log.get("wandb_entity"), name, directory,
            os.path.join(save, WANDB_ID_FILE) if save else None)


def require_wandb() -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise UserInputError("logging.wandb_project is set but wandb is not installed: `pip install wandb` "
                             "(or `pip install .[wandb]`), or unset logging.wandb_project")


def new_run_id() -> str:
    """A W&B run id: 8 random lower-case letters and digits (W&B's own format)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_id(path: Optional[str]) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except (OSError, TypeError):
        return None


def _write_id(path: str, run_id: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)


def _init_or_explain(wandb, **kwargs):
    """``wandb.init``; a failure to start (not logged in on a machine without a terminal, a wrong
    entity, no network in online mode) is an error that says what to do, at start-up."""
    try:
        return wandb.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - wandb raises its own error types
        raise UserInputError(
            f"Weights & Biases did not start ({type(exc).__name__}: {exc}). Log in on this machine "
            "(`wandb login`, or export WANDB_API_KEY), or run offline (WANDB_MODE=offline, upload later "
            "with `wandb sync`), or unset logging.wandb_project") from None


class WandbRun:
    """One process's W&B run, resumed by id: ``log({name: value}, step)``, ``finish()``.

    The id comes from ``id_file`` when it exists, else a new one is written there as soon as the run
    has started, so every later start with the same file (a requeue, a resume, a stage script rerun)
    continues that run. W&B's service process (wandb-core) is started with the stop signals blocked
    (as the checkpoint helpers are, training/signals.py): SLURM signals every process of the job
    step, and a SIGUSR1 (the pre-timeout warning, ``scancel --signal=USR1``) must leave it running
    while the ranks save. A Go program cannot keep SIGTERM/SIGINT blocked, so those end the service;
    logging then stops with one message (:meth:`_guard`) and training goes on."""

    def __init__(self, project: str, *, entity: Optional[str] = None, name: Optional[str] = None,
                 directory: Optional[str] = None, id_file: Optional[str] = None, config: Optional[dict] = None,
                 job_type: Optional[str] = None, group: Optional[str] = None, step_metric: Optional[str] = None):
        require_wandb()
        import wandb

        from longcat_megatron.training.signals import _spawn_with_stop_signals_blocked

        run_id = _read_id(id_file)
        self.resumed = run_id is not None
        if run_id is None:
            run_id = new_run_id()
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.id = run_id
        try:
            self.run = _spawn_with_stop_signals_blocked(lambda: _init_or_explain(wandb,
                project=project, entity=entity, name=name, dir=directory, id=run_id, resume="allow",
                config=config or {}, job_type=job_type, group=group, allow_val_change=True,
                # the job log keeps the text output: no wrapper around this process's stdout/stderr
                settings=wandb.Settings(console="off")))
        except UserInputError as exc:
            if not self.resumed:
                raise  # the first start: a wrong setup is reported before anything runs
            # a requeue or resume of a run that did log: a W&B outage must not keep training down
            print(f"[wandb] could not resume run {run_id}; going on without W&B. {exc}", file=sys.stderr,
                  flush=True)
            self.run = None
            self.step_metric = step_metric
            return
        if id_file and not self.resumed:  # kept once the run exists: every later start continues it
            _write_id(id_file, run_id)
        self.step_metric = step_metric
        if step_metric:  # a run whose x axis is a logged value, not W&B's own (monotone) step
            self.run.define_metric(step_metric)
            self.run.define_metric("*", step_metric=step_metric)

    def log(self, values: dict, step: Optional[int] = None) -> None:
        if values and self.run is not None:
            self._guard(lambda: self.run.log({**values, self.step_metric: step}) if self.step_metric
                        else self.run.log(values, step=step))

    def finish(self) -> None:
        if self.run is not None:
            self._guard(self.run.finish)
            self.run = None

    def _guard(self, call) -> None:
        """W&B never stops training: a failure (its service gone, e.g. killed by a SIGTERM to the job
        step: Go programs cannot block SIGTERM) is reported once, and this run stops logging."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any W&B failure
            print(f"[wandb] logging stopped: {type(exc).__name__}: {exc} (training goes on; TensorBoard has "
                  "every scalar)", file=sys.stderr, flush=True)
            self._detach()

    def _detach(self) -> None:
        """Leave nothing of the broken run that could raise later: W&B's import hooks (it records which
        libraries get imported, and with its service gone any such import, e.g. during a save,
        would raise) and its telemetry."""
        run, self.run = self.run, None
        try:
            from wandb.sdk.lib import import_hooks

            import_hooks.unregister_all_post_import_hooks()
        except Exception:  # noqa: BLE001 - W&B internals moved: nothing more to undo
            pass
        try:
            run._telemetry_obj_active = False
        except Exception:  # noqa: BLE001
            pass


def training_wandb_run(run_config, world_size: int) -> Optional[WandbRun]:
    """The W&B run of a training run (rank 0), or None without ``logging.wandb_project``."""
    project, entity, name, directory, id_file = wandb_settings(run_config)
    if not project:
        return None
    config = asdict(run_config) if is_dataclass(run_config) else dict(run_config)
    config["recipe"] = recipe_labels()
    config["launch"] = {"world_size": world_size, **{k.lower(): os.environ[k] for k in
                                                    ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NUM_NODES")
                                                    if k in os.environ}}
    return WandbRun(project, entity=entity, name=name, directory=directory, id_file=id_file, config=config,
                    job_type="train")


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def peak_memory_gb() -> tuple[float, str]:
    """(peak bytes / 1e9, what was measured): CUDA peak allocated, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9, "GPU"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "RSS"


def device_peak_tflops() -> Optional[float]:
    """Dense BF16 peak of this rank's GPU by name (None on CPU or an unknown GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from longcat_megatron.model.flops import peak_tflops_of

    return peak_tflops_of(torch.cuda.get_device_name())


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressLogger:
    """Prints ``iter 10/100 | loss ... | lr ... | grad-norm ... | tok/s ... | eta ...`` and logs the
    same scalars to TensorBoard. Only the rank that owns it (``enabled``) writes anything."""

    def __init__(self, enabled: bool, total_iters: int, tokens_per_iter: int,
                 tensorboard_dir: Optional[str] = None, interval: int = 1, stream=None,
                 flops_per_token: Optional[Callable[[Optional[float]], float]] = None,
                 world_size: int = 1, peak_tflops: Optional[float] = None, run_config=None):
        """``flops_per_token(experts_per_token or None)``: training FLOPs per token (enables the
        TFLOP/s figure); ``peak_tflops``: per-GPU peak for MFU (None: not shown); ``run_config``:
        the RunConfig, for W&B (``logging.wandb_*``; its config; the id beside the checkpoints)."""
        self.enabled = enabled
        self.total = total_iters
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token = flops_per_token
        self.world_size = max(1, world_size)
        self.peak_tflops = peak_tflops
        self._tokens_last: Optional[int] = None
        self.interval = max(1, interval)
        self.stream = stream or sys.stdout
        self.writer = None
        self._t_last = time.monotonic()
        self._it_last: Optional[int] = None
        self.history: list[tuple[int, float]] = []
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.wandb: Optional[WandbRun] = None
        self._pending: dict = {}
        if run_config is not None and wandb_settings(run_config)[0]:
            require_wandb()  # on every rank: a missing package stops all of them, not only rank 0
            if enabled:
                self.wandb = training_wandb_run(run_config, self.world_size)
                if self.wandb.run is None:
                    self.wandb = None
                else:
                    self.print(f"[wandb] {'resumed' if self.wandb.resumed else 'started'} run {self.wandb.id} "
                               f"(project {wandb_settings(run_config)[0]}, files under {self.wandb.run.dir})")

    def _add(self, name: str, value: float, iteration: int) -> None:
        """One scalar for TensorBoard and W&B (sent at the end of the step)."""
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self._pending[name] = value

    def _flush(self, iteration: int) -> None:
        if self.wandb is not None and self._pending:
            self.wandb.log(self._pending, step=iteration)
            self._pending = {}

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start(self, iteration: int, tokens: Optional[int] = None) -> None:
        self._t_last = time.monotonic()
        self._it_last = iteration
        self._tokens_last = tokens

    def step(self, iteration: int, scalars: dict, extra: Optional[dict] = None,
             tokens: Optional[int] = None) -> None:
        """Record one finished iteration (``tokens``: trained so far, all stages of this run's
        data position); print every ``interval`` iterations."""
        if not self.enabled:
            return
        if "loss" in scalars:
            self.history.append((iteration, scalars["loss"]))
        for k, v in {**scalars, **(extra or {})}.items():
            self._add(k, v, iteration)
        if iteration % self.interval and iteration != self.total:
            self._flush(iteration)
            return
        now = time.monotonic()
        its = iteration - (self._it_last if self._it_last is not None else iteration - 1)
        dt = (now - self._t_last) / max(its, 1)
        if tokens is not None and self._tokens_last is not None and its > 0:
            step_tokens = (tokens - self._tokens_last) / its
        else:
            step_tokens = self.tokens_per_iter
        self._t_last, self._it_last, self._tokens_last = now, iteration, tokens
        parts = [f"iter {iteration:>6d}/{self.total}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "lr" in scalars:
            parts.append(f"lr {scalars['lr']:.3e}")
        if "grad_norm" in scalars:
            parts.append(f"grad-norm {scalars['grad_norm']:.3f}")
        if tokens is not None:
            parts.append(f"tokens {_fmt_count(tokens)}")
        tok_s = step_tokens / max(dt, 1e-9)
        parts.append(f"{tok_s:,.0f} tok/s")
        figures = self.figures(tok_s, (extra or {}).get("progress/experts/tok"))
        if "tflops_per_gpu" in figures:
            per = "GPU" if figures["mem_kind"] == "GPU" else "rank"
            tf = figures["tflops_per_gpu"]
            parts.append(f"{tf:.1f} TFLOP/s/{per}" if tf >= 1 else f"{tf * 1e3:.2f} GFLOP/s/{per}")
        if "mfu" in figures:
            parts.append(f"MFU {figures['mfu']:.1%}")
        parts.append(f"mem {figures['peak_mem_gb']:.2f} GB {figures['mem_kind']}")
        parts.append(f"{dt:.3f} s/it")
        for k, v in figures.items():
            if isinstance(v, float):
                self._add(f"throughput/{k}", v, iteration)
        self._add("throughput/tokens_per_s", tok_s, iteration)
        if tokens is not None:
            self._add("tokens", tokens, iteration)
        self._flush(iteration)
        parts.append(f"eta {_fmt_duration(dt * (self.total - iteration))}")
        for k, v in (extra or {}).items():
            if k.startswith("progress/"):
                parts.append(f"{k[len('progress/'):]} {v:.3g}")
        self.print(" | ".join(parts))

    def figures(self, tokens_per_s: float, experts_per_token: Optional[float] = None) -> dict:
        """TFLOP/s per GPU (all ranks' tokens / world size), MFU and peak memory of this rank."""
        out: dict = {}
        if self.flops_per_token is not None:
            tflops = self.flops_per_token(experts_per_token) * tokens_per_s / self.world_size / 1e12
            out["tflops_per_gpu"] = tflops
            if self.peak_tflops:
                out["mfu"] = tflops / self.peak_tflops
        out["peak_mem_gb"], out["mem_kind"] = peak_memory_gb()
        return out

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.enabled:
            self._add(name, value, iteration)
            self._flush(iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
