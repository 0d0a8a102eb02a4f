"""Command line: ``python -m longcat_megatron.train --config configs/tiny.yaml [section.field=value ...]``.

Start one process per rank with torchrun (``launch/local.sh``) or srun (``launch/pretrain.sh``).
Examples::

    torchrun --nproc-per-node 2 --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 -m longcat_megatron.train --config configs/tiny.yaml parallel.tensor=2
    python -m longcat_megatron.train --config configs/tiny.yaml --dry-run

Every field of the YAML config can be overridden as ``section.field=value`` (values parsed as YAML).
A run saves to ``checkpoint.save`` and resumes from its latest complete checkpoint automatically
(``checkpoint.load`` only seeds a run whose save directory holds no checkpoint yet). Exit codes:
0 done, 2 bad config/input, 75 stopped early after saving (signal or time limit: requeue the job),
76 the hang watchdog ended a rank (``train.hang_timeout_mins``: requeue like a crash).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longcat_megatron.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--stage", default=None,
                   help="stage file (configs/stages/*.yaml): its values override the config, the "
                        "command line overrides both")
    p.add_argument("--dry-run", action="store_true",
                   help="validate config, data paths and parallel sizes, print the plan, do not train")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: plan for this many processes (default: launcher's WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="with --dry-run: memory per GPU the plan must fit (default 80); over it: exit 2")
    p.add_argument("--force", action="store_true",
                   help="with --dry-run: print an over-budget memory plan as a warning instead of exit 2")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides, e.g. parallel.tensor=2 train.train_iters=50")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from longcat_megatron.config import load_config
    from longcat_megatron.errors import UserInputError

    bad_input = (UserInputError,)
    try:
        stage = []
        if args.stage:
            from longcat_megatron.recipe import stage_overrides

            stage = stage_overrides(args.stage)
        cfg = load_config(args.config, stage + list(args.overrides))
    except bad_input as e:
        return _fail(str(e))

    from longcat_megatron import runtime

    runtime.silence_known_warnings()
    if args.dry_run:
        from longcat_megatron.planning import print_plan

        from longcat_megatron.data.check import check_data

        world = args.world_size or runtime.launcher_env()[1]
        try:
            data_ok = check_data(cfg.data)  # the same data check as training
            print_plan(cfg, world, gpu_memory_gb=args.gpu_memory_gb, force=args.force)
        except bad_input as e:
            return _fail(str(e))
        print(f"  {data_ok}")
        from longcat_megatron.training.stability import describe as describe_stability

        print(describe_stability(cfg))
        from longcat_megatron.training.sdc import describe as describe_sdc

        print(describe_sdc(cfg))
        from longcat_megatron.recipe import describe_batch_schedule, print_labels

        if describe_batch_schedule(cfg):
            print(describe_batch_schedule(cfg))
        print_labels([args.config] + ([args.stage] if args.stage else []), args.overrides)
        return 0

    from longcat_megatron.training.loop import train
    from longcat_megatron.training.progress import note_recipe

    note_recipe([args.config, args.stage], stage + list(args.overrides))  # W&B config: the recipe labels

    p = cfg.parallel
    from longcat_megatron.training import determinism

    try:
        determinism.configure(cfg.train.deterministic)  # before any NCCL communicator exists
        layout = runtime.initialize(
            tensor=p.tensor, pipeline=p.pipeline, context=p.context, expert=p.expert,
            virtual_pipeline=p.virtual_pipeline, num_experts=cfg.model.num_experts,
            seed=cfg.train.seed, backend=p.backend, expert_tensor=p.expert_tensor,
        )
    except bad_input as e:
        return _fail(str(e))
    try:
        result = train(cfg, layout)
    except bad_input as e:
        return _fail(str(e))
    finally:
        runtime.shutdown()
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
