"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

A run config is a tree of dataclasses (:class:`RunConfig`). ``load_config(path, overrides)`` reads a
YAML file from ``configs/``, applies overrides such as ``parallel.tensor=2`` and checks every field:
an unknown field or a value of the wrong type raises :class:`ConfigError` naming the field, what is
allowed and where it came from. The resolved config is written as YAML next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from longcat_megatron.errors import UserInputError

from longcat_megatron.data.config import DataConfig
from longcat_megatron.model.config import ModelConfig
from longcat_megatron.transfer import TransferConfig, validate_transfer


class ConfigError(UserInputError):
    """A config file, field or override is invalid; the message says which and how to fix it."""


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size is derived: world / (tensor * pipeline * context)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    expert: int = 1
    # Expert tensor-parallel size (experts split over this many ranks); None = parallel.tensor.
    expert_tensor: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    # megatron DDP: overlap the gradient reduce-scatter/all-reduce with backward, and (distributed
    # optimizer) the parameter all-gather with the next forward.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # megatron DDP bucket size in parameters (used with overlap_grad_reduce); None = megatron's
    # default, max(40M, 1M x DP). Small values give a small model the multi-bucket paths of a big one.
    ddp_bucket_size: Optional[int] = None
    # "auto" | "gloo" | "nccl". auto: NCCL when CUDA is usable, gloo when the run asked for the CPU
    # (LONGCAT_FORCE_CPU=1) or nothing suggests GPUs, an error naming the cause when GPUs were
    # evidently expected (runtime.choose_backend); the GPU-mode launchers pass nccl.
    backend: str = "auto"


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 0
    eval_iters: int = 2
    # Stop (after saving) once this many minutes have passed; 0 = no limit.
    exit_duration_mins: float = 0.0
    # Save and exit on SIGTERM/SIGUSR1 (SLURM pre-timeout warning, scancel --signal).
    exit_signal_handler: bool = True
    # Stop after this iteration (saving first), e.g. to split a run in two; 0 = train_iters.
    exit_interval: int = 0
    # Hang watchdog: no step completed for this many minutes -> dump every thread's Python stack to
    # the log dir and exit 76 (requeued by launch/common.sh); fractions allowed; 0 = off.
    hang_timeout_mins: float = 0.0
    # Activation recompute: "none", "selective" (LongCat: core attention, MLA up projections,
    # expert activation) or "full" (each layer recomputed from its input in the backward).
    recompute: str = "none"
    # With "full": recompute only the first N layers of each pipeline chunk (None = all).
    recompute_num_layers: Optional[int] = None
    # Step changes of the global batch at token thresholds: ["420B:2048"] or
    # [{after_tokens: 420e9, global_batch_size: 2048}] (training/batch_schedule.py).
    batch_schedule: list = field(default_factory=list)
    # Every N iterations, check that data-parallel (and expert-data-parallel) replicas hold bitwise
    # the same parameters the forward just used (training/replica_check.py); stops the run with a
    # message naming the parameters that differ. 0 = off (Megatron-LM's
    # --check-weight-hash-across-dp-replicas-interval).
    check_replicas_interval: int = 0
    # stability guard (training/stability.py): a non-finite loss/gradient or a loss spike skips the
    # update; instability_limit skipped steps within instability_window iterations stop the run
    # (exit 77) or, with spike_rollback, restart from the last committed checkpoint skipping the
    # unstable batches and spike_skip_batches more (at most spike_rollback_max times).
    skip_non_finite: bool = True
    spike_factor: float = 3.0  # guess: no source; a 3x jump over the recent median is never healthy
    spike_window: int = 50     # guess: accepted losses whose median is the spike reference
    instability_limit: int = 5  # guess: 0 = never stop
    instability_window: int = 100  # guess
    spike_rollback: bool = False
    spike_skip_batches: int = 200  # guess: PaLM skipped "about 200-500 data batches" past a spike
    spike_rollback_max: int = 3  # guess
    # Deterministic kernels and collectives (training/determinism.py): the same seed gives bitwise
    # the same run, at some speed cost. Needed by sdc_check_interval (a bitwise comparison).
    deterministic: bool = False
    # Silent-data-corruption detection (training/sdc.py). rerun_mode is megatron-core's rerun state
    # machine: "validate_results" re-runs a step whose loss is non-finite; a result the re-run does
    # not reproduce is a hardware fault (exit 78: the launcher requeues without the node), a
    # reproduced one is numerics (the stability guard above). "disabled" or
    # "report_determinism_stats" (every step runs twice; the log reports the differences).
    rerun_mode: str = "disabled"
    # Every N iterations replay micro-batch 0's forward and compare every module output bitwise
    # with the step's own forward; a difference is exit 78. Needs deterministic=true. 0 = off.
    sdc_check_interval: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then 'cosine', 'linear', 'constant' or 'wsd'."""

    style: str = "cosine"
    warmup_iters: int = 10
    # Iterations over which the LR decays (default: train_iters).
    decay_iters: Optional[int] = None
    # WSD: length of the final decay phase, and its shape ('linear', 'cosine', 'exponential', 'minus_sqrt').
    wsd_decay_iters: int = 0
    wsd_decay_style: str = "linear"


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    # Where a run starts from while checkpoint.save holds no committed checkpoint (e.g. the previous
    # stage); once it does, the run resumes its own checkpoint (a requeued stage never goes back).
    load: Optional[str] = None
    save_interval: int = 0
    # Optimizer checkpoint format. true: megatron's fully_reshardable (resume under any TP/PP/EP/DP);
    # false: dp_reshardable (faster to save and load; only DP may change on resume). Both are written
    # and read fully in parallel (every rank its own shards).
    fully_reshardable: bool = True
    # Write shards in a background process while training goes on (committed at a later step).
    async_save: bool = False
    # megatron's fully-parallel strategies: the data-parallel replicas share the writing (reading) of
    # replicated tensors instead of DP rank 0 doing it all; the files are the same either way.
    fully_parallel_save: bool = True
    fully_parallel_load: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    # Start from --load's weights with iteration 0, fresh optimizer and schedule (fine-tuning).
    finetune: bool = False
    # Start a new stage from --load's weights AND optimizer state, with iteration 0 and a fresh LR
    # schedule and data position (e.g. mid-training that keeps Adam's moments).
    reset_schedule: bool = False
    # Resume even though the dataset fingerprint in the checkpoint differs from this run's data.
    allow_data_change: bool = False
    # Retention: keep the newest keep_last committed checkpoints (0 = keep all) plus, for good, every
    # iteration that is a multiple of keep_every (0 = none).
    keep_last: int = 3
    keep_every: int = 0
    # Check every file of the checkpoint against its SHA-256 (checksums.json) before loading it.
    verify_on_load: bool = True
    # On a damaged checkpoint, resume from the previous complete one (the damaged directory is
    # renamed *.corrupt-*, not deleted) instead of stopping with exit 2.
    fallback_on_corruption: bool = False
    # How the fully_reshardable optimizer state is brought together at a save and read at a load
    # (docs/operations.md, "Checkpoints at scale"): per_param = each parameter's state assembled on
    # one data-parallel rank that holds a piece of it, and read in phases by the ranks holding its
    # pieces (host RAM per rank ~ its 1/DP share); all_ranks = megatron's default (every rank holds
    # the whole state of its model-parallel shard, at every save and load); dp_rank_0 = megatron's
    # mem_efficient variant (gathered over gloo on data-parallel rank 0, which writes all of it;
    # loads as all_ranks). The files are interchangeable: each reads what any of them wrote.
    optimizer_gather: str = "per_param"
    # Host RAM per node (GB) that checkpoint saves and loads may use: --dry-run refuses a plan whose
    # worst node needs more (--force: a warning). null: printed, not checked.
    host_memory_gb: Optional[float] = None


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    progress: bool = True
    # Per-GPU dense peak TFLOP/s for the progress line's MFU (default: known from the GPU's name;
    # unknown GPU or CPU: MFU not shown, TFLOP/s still is).
    peak_tflops: Optional[float] = None
    # Weights & Biases next to TensorBoard (rank 0, the same scalars; the resolved run config and the
    # recipe labels as the run's config): set a project to turn it on. The run id is kept beside the
    # checkpoints (checkpoint.save/wandb_run_id.txt), so a requeued or resumed run continues the
    # same W&B run. WANDB_MODE=offline keeps it on disk only (upload later: `wandb sync DIR`).
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None  # team or user (default: the API key's default entity)
    wandb_name: Optional[str] = None  # run name (default: the checkpoint directory's name)
    wandb_dir: Optional[str] = None  # where its wandb/ directory goes (default: checkpoint.save, else .)
    # router stability (training/router_stability.py): R_g and expert cosine per MoE layer on
    # logging steps; warn when R_g > grad_balance_bound for grad_balance_patience measured steps.
    router_stability: bool = True
    grad_balance_bound: float = 0.1  # reference §3.3: the LongCat team keeps R_g < 0.1
    grad_balance_patience: int = 3  # guess


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # hyperparameter transfer by width scaling (longcat_megatron/transfer.py)
    transfer: TransferConfig = field(default_factory=TransferConfig)


# ------------------------------------------------------------------------------------ conversion
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, where: str):
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError at ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"unknown field '{name}'. Allowed fields{' of ' + where if where else ''}: "
            f"{', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
    return obj


def build_section(cls, tree: Any, where: str = ""):
    """Build the dataclass ``cls`` (a RunConfig or one of its sections) from a plain mapping with the
    same field checks as :func:`load_config`, but without the run-level validation (data paths,
    parallel sizes): for tools that read a saved ``run_config.yaml``."""
    return _build(cls, tree, where)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'a.b=3'`` -> ``('a.b', 3)``; the value is parsed as YAML (numbers, true/false, lists, null)."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' is not of the form section.field=value (e.g. parallel.tensor=2)"
        )
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                check: bool = True) -> RunConfig:
    """Load a RunConfig from a YAML file plus ``section.field=value`` overrides, fully validated
    (``check=False``: field checks only, e.g. a cluster config read on a laptop)."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    where = f" (in {path})" if path else ""
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None
    if check:
        validate(cfg)
    return cfg


# Longest sequence for which model.arch=gpt gets a dense per-sample document mask (8k: 64 MiB).
GPT_DENSE_MASK_LIMIT = 8192


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group (sizes vs. model shape, schedule names, batch sizes)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("tensor", "pipeline", "context", "expert"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)} must be >= 1")
    if m.num_attention_heads % p.tensor:
        raise ConfigError(
            f"parallel.tensor={p.tensor} does not divide model.num_attention_heads="
            f"{m.num_attention_heads}; pick a tensor-parallel size that divides the head count"
        )
    validate_pipeline(m, p)
    if m.arch == "gpt" and cfg.data.reset_attention_mask and cfg.data.seq_length > GPT_DENSE_MASK_LIMIT:
        raise ConfigError(
            f"data.reset_attention_mask=true with model.arch=gpt and data.seq_length="
            f"{cfg.data.seq_length}: megatron's GPTModel takes document masks as a dense [s, s] mask "
            f"(limited to seq_length <= {GPT_DENSE_MASK_LIMIT}); the LongCat model "
            "(model.arch=longcat) masks documents at any length"
        )
    if m.num_experts:
        if m.num_experts % p.expert:
            raise ConfigError(
                f"parallel.expert={p.expert} does not divide model.num_experts={m.num_experts}"
            )
        if p.tensor > 1 and not p.sequence_parallel:
            raise ConfigError(
                "MoE with parallel.tensor > 1 needs parallel.sequence_parallel=true "
                "(megatron-core requires it)"
            )
    elif p.expert > 1:
        raise ConfigError(f"parallel.expert={p.expert} but the model has no experts (model.num_experts)")
    if p.expert_tensor is not None:
        if p.expert_tensor < 1:
            raise ConfigError(f"parallel.expert_tensor={p.expert_tensor} must be >= 1 (or null = "
                              "parallel.tensor)")
        width = m.moe_ffn_hidden_size or m.ffn_hidden_size
        if m.num_experts and width % p.expert_tensor:
            raise ConfigError(f"parallel.expert_tensor={p.expert_tensor} does not divide the expert "
                              f"width model.moe_ffn_hidden_size={width}")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer="
                          "true (the parameter all-gather is the distributed optimizer's)")
    if p.context > 1:
        if cfg.data.seq_length % (2 * p.context):
            raise ConfigError(
                f"data.seq_length={cfg.data.seq_length} must be divisible by 2 x parallel.context "
                f"= {2 * p.context} (the load-balanced context-parallel split)"
            )
        if m.arch == "longcat":
            # The LongCat MLA gathers its compressed keys over CP itself (no TransformerEngine).
            if m.device_lb_loss_coeff > 0:
                raise ConfigError(
                    f"parallel.context={p.context} with model.device_lb_loss_coeff="
                    f"{m.device_lb_loss_coeff}: the device-level load-balance loss does not reduce "
                    "over the context-parallel group yet; set model.device_lb_loss_coeff=0 or "
                    "parallel.context=1"
                )
        else:
            from longcat_megatron.mcore_fixes import have_transformer_engine

            if not have_transformer_engine():
                raise ConfigError(
                    f"parallel.context={p.context}: megatron-core's context parallelism needs "
                    "TransformerEngine attention (GPU); without it use parallel.context=1"
                )
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits activations over "
            "the tensor-parallel ranks; megatron-core fails at TP=1): set "
            "parallel.sequence_parallel=false (SEQUENCE_PARALLEL=false for the stage scripts) or "
            "raise parallel.tensor"
        )
    if p.sequence_parallel and cfg.data.seq_length % (p.tensor * p.context):
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length} must be divisible by parallel.tensor x "
            f"parallel.context = {p.tensor * p.context} under sequence parallelism (the sequence is "
            "split over the tensor-parallel ranks)"
        )
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size={p.ddp_bucket_size} must be >= 1 (parameters "
                          "per bucket) or null for megatron's default")
    if t.check_replicas_interval < 0:
        raise ConfigError(f"train.check_replicas_interval={t.check_replicas_interval} must be >= 0 "
                          "(0 = off)")
    validate_checkpoint(cfg.checkpoint)
    validate_stability(t, cfg.logging)
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"parallel.backend={p.backend!r}: use auto, gloo or nccl")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if t.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"train.recompute={t.recompute!r}: use none, selective or full")
    if t.recompute_num_layers is not None and (t.recompute != "full" or t.recompute_num_layers < 1):
        raise ConfigError(
            f"train.recompute_num_layers={t.recompute_num_layers} needs train.recompute=full and "
            "a value >= 1 (layers per pipeline chunk to recompute); remove it otherwise")
    if t.batch_schedule:
        from longcat_megatron.training.batch_schedule import check as check_batch_schedule

        check_batch_schedule(t.global_batch_size, t.batch_schedule, t.micro_batch_size)
    if cfg.schedule.style not in ("cosine", "linear", "constant", "wsd"):
        raise ConfigError(
            f"schedule.style={cfg.schedule.style!r}: use cosine, linear, constant or wsd"
        )
    if t.hang_timeout_mins < 0:
        raise ConfigError(f"train.hang_timeout_mins={t.hang_timeout_mins} must be >= 0 (0 = off)")
    if cfg.schedule.style == "wsd" and cfg.schedule.wsd_decay_iters <= 0:
        raise ConfigError("schedule.style=wsd needs schedule.wsd_decay_iters > 0")
    if cfg.data.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}"
        )
    cfg.data.validate()
    m.validate()
    validate_transfer(cfg)  # hyperparameter transfer by width scaling
    for section, ngram in (("model.ngram", m.ngram), ("model.per_layer_ngram", m.layer_ngram())):
        if ngram is None:
            continue
        from longcat_megatron.data.tokenizer import resolve_eod_token_id

        eod = resolve_eod_token_id(cfg.data)
        if eod != ngram.eos_token_id:
            source = f"the EOS of data.tokenizer={cfg.data.tokenizer}" if cfg.data.tokenizer \
                else "data.eod_token_id"
            raise ConfigError(
                f"{section}.eos_token_id={ngram.eos_token_id} but documents end with token {eod} "
                f"({source}): the N-gram hash would not reset at document boundaries; set "
                f"{section}.eos_token_id={eod}"
            )


def validate_pipeline(m, p: ParallelConfig) -> None:
    """The pipeline layout vs the layer count (also what ``ckpt_convert.grow`` checks a grown depth
    against): every (virtual) pipeline stage holds the same number of layers."""
    if m.num_layers % p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} does not divide model.num_layers={m.num_layers}"
        )
    if p.virtual_pipeline and m.num_layers % (p.pipeline * p.virtual_pipeline):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline * "
            f"parallel.virtual_pipeline = {p.pipeline * p.virtual_pipeline}"
        )


def validate_checkpoint(c: CheckpointConfig) -> None:
    """Checkpoint settings that would fail only at the first save or load."""
    for name in ("save_interval", "keep_last", "keep_every"):
        if getattr(c, name) < 0:
            raise ConfigError(f"checkpoint.{name}={getattr(c, name)} must be >= 0 (0 = off)")
    if c.fallback_on_corruption and not c.verify_on_load:
        raise ConfigError("checkpoint.fallback_on_corruption=true needs checkpoint.verify_on_load=true "
                          "(damage is found by the verification)")


# ---- stability guard and router stability settings (training/stability.py, router_stability.py)
RERUN_MODES = ("disabled", "validate_results", "report_determinism_stats")


def validate_stability(t: TrainConfig, lg: LoggingConfig) -> None:
    """The ``train.*`` stability and ``logging.*`` router-stability settings."""
    for name in ("spike_window", "instability_window", "spike_skip_batches"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1")
    for name in ("instability_limit", "spike_rollback_max"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0 (0 = off)")
    if t.spike_factor != 0 and t.spike_factor <= 1:
        raise ConfigError(f"train.spike_factor={t.spike_factor} must be > 1 (a multiple of the recent "
                          "median loss) or 0 (no spike detection)")
    if t.instability_limit > t.instability_window:
        raise ConfigError(f"train.instability_limit={t.instability_limit} exceeds "
                          f"train.instability_window={t.instability_window}: it could never be reached")
    if t.spike_rollback and not t.instability_limit:
        raise ConfigError("train.spike_rollback=true needs train.instability_limit > 0 (the rollback "
                          "happens when the limit is reached)")
    if t.rerun_mode not in RERUN_MODES:
        raise ConfigError(f"train.rerun_mode={t.rerun_mode!r} must be one of {', '.join(RERUN_MODES)}")
    if t.sdc_check_interval < 0:
        raise ConfigError(f"train.sdc_check_interval={t.sdc_check_interval} must be >= 0 (0 = off)")
    if t.sdc_check_interval and not t.deterministic:
        raise ConfigError(f"train.sdc_check_interval={t.sdc_check_interval} compares a replayed forward "
                          "bitwise and needs train.deterministic=true (non-deterministic kernels would "
                          "report faults that are not there)")
    if lg.grad_balance_bound <= 0 or lg.grad_balance_patience < 1:
        raise ConfigError(f"logging.grad_balance_bound={lg.grad_balance_bound} must be > 0 and "
                          f"logging.grad_balance_patience={lg.grad_balance_patience} >= 1")


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
