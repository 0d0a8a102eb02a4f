"""Embedding scaling vs expert scaling: train a family of matched small LongCat models and report them.

    python -m longcat_megatron.study --spec studies/embedding_vs_experts.yaml
    python -m longcat_megatron.study --spec SPEC --list              # the runs, their sizes; trains nothing
    python -m longcat_megatron.study --spec SPEC --run-index 3 --no-report   # one run (a SLURM array task)
    python -m longcat_megatron.study --spec SPEC --report-only       # aggregate whatever finished
    sbatch --array=0-<n-1> launch/study.sh SPEC                      # one array task per run, then:
    sbatch --dependency=afterany:<jobid> launch/study.sh SPEC --report-only

The spec (YAML, see studies/embedding_vs_experts.yaml and docs/embedding_study.md) gives a base
``arch: longcat`` run config, the corpus (default: data_tools.tiny_corpus, tokenized once under
runs_dir/data, with a validation split) and the runs: the vanilla MoE, more FFN experts or N-gram
Embedding parameters at several total/activated ratios (the expert count / N-gram vocabulary ratio
is solved for to hit the target), N/K shapes, amplification, vocabulary ratios. Runs train one
after the other as ``python -m longcat_megatron.train`` subprocesses in runs_dir/<run>/; a run with
a result.json for the same config is not trained again, an interrupted one resumes from its
checkpoint. The report (markdown table + plots) goes to the spec's ``report`` / ``figures_dir``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from longcat_megatron.errors import UserInputError


def _parser() -> argparse.ArgumentParser:
    doc = __doc__
    p = argparse.ArgumentParser(prog="python -m longcat_megatron.study", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="study spec YAML (e.g. studies/embedding_vs_experts.yaml)")
    p.add_argument("--run-index", type=int, default=None,
                   help="train only run number I (0-based, spec order; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--run", default=None, help="train only the run of this name")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--no-report", action="store_true", help="train, but write no report (array tasks)")
    p.add_argument("--list", action="store_true", help="print the runs with their parameter counts and exit")
    p.add_argument("--report", default=None, help="report markdown path (default: the spec's report)")
    p.add_argument("--figures-dir", default=None, help="figure directory (default: the spec's figures_dir)")
    p.add_argument("--keep-going", action="store_true",
                   help="a failed run does not stop the others (the report lists it as not finished)")
    return p


def _list(spec) -> str:
    from longcat_megatron.study.spec import counts, run_model

    lines = [f"{'#':>2} {'run':<22} {'strategy':<14} {'experts':>7} {'ngram ratio':>11} {'total':>11} "
             f"{'activated':>10} {'tot/act':>7} {'ngram %':>7}"]
    for i, run in enumerate(spec.runs):
        cfg = run_model(spec, run)
        c = counts(cfg)
        ratio = f"{cfg.ngram.ngram_vocab_size_ratio:g}" if cfg.ngram else "-"
        lines.append(f"{i:>2} {run.name:<22} {run.strategy:<14} {cfg.num_experts:>7} {ratio:>11} "
                     f"{c['total']:>11,} {c['activated']:>10,} {c['total'] / c['activated']:>7.2f} "
                     f"{c['ngram'] / c['total']:>7.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from longcat_megatron.study import report, runner
    from longcat_megatron.study.spec import load_spec

    try:
        spec = load_spec(args.spec)
        if args.list:
            print(_list(spec))
            return 0
        selected = list(spec.runs)
        if args.run_index is not None:
            if not 0 <= args.run_index < len(spec.runs):
                raise UserInputError(f"--run-index {args.run_index}: the spec has runs 0..{len(spec.runs) - 1}")
            selected = [spec.runs[args.run_index]]
        if args.run is not None:
            selected = [r for r in spec.runs if r.name == args.run]
            if not selected:
                raise UserInputError(f"--run {args.run}: no such run; runs: {[r.name for r in spec.runs]}")
        failed = []
        if not args.report_only:
            for run in selected:
                try:
                    runner.execute(spec, run)
                except runner.StudyRunError as e:
                    if not args.keep_going:
                        raise
                    print(f"[study] {e}", file=sys.stderr)
                    failed.append(run.name)
        if not args.no_report:
            results = {r.name: res for r in spec.runs if (res := runner.read_result(spec, r)) is not None}
            command = f"python -m longcat_megatron.study --spec {shlex.quote(args.spec)}"
            path, figs = report.write_report(spec, results, command, args.report, args.figures_dir)
            print(f"[study] report: {path} ({len(results)}/{len(spec.runs)} runs); figures: {', '.join(figs) or '-'}")
        return 1 if failed else 0
    except UserInputError as e:
        print(f"study: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
