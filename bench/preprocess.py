"""Benchmark our preprocessing against Megatron-LM's ``tools/preprocess_data.py`` on the same input.

Example::

    python bench/preprocess.py --mlm /path/to/Megatron-LM --workers 2 --corpus-mb 40 \\
        --write-docs docs/benchmarks.md

Builds (once, offline, in ``--work``) a JSONL corpus from the running Python's standard library and
help texts, and a 32k byte-level BPE tokenizer trained on part of it (or takes ``--corpus`` and
``--tokenizer``). Then runs, one after the other and with the same worker count:

* ``python -m data_tools.preprocess`` (ours) on the full corpus and on its first quarter, to show
  whether peak memory grows with corpus size;
* Megatron-LM's ``tools/preprocess_data.py --append-eod --tokenizer-type HuggingFaceTokenizer`` (if
  ``--mlm`` is given), launched unmodified from its checkout. On Python 3.11 it needs a
  ``typing.override`` shim (written to ``--work``) and ``triton`` importable (megatron.core imports
  it); pass extra import paths with ``--mlm-pythonpath``;
* the job-array path (``--tasks 1 2``, the default): the corpus cut into ``--files`` JSONL files,
  then for each task count N, N tasks at once (``--task-index i --num-tasks N``, ``--workers``/N
  tokenizer processes each, so the same cores in all) and the final step (``--finalize``): tokens/s
  of all tasks together and per task. On a cluster each task has a node of its own, so there the
  aggregate grows with N; on one machine the comparison shows what slicing itself costs. The
  datasets of every N are compared token for token.

``--plot FILE`` draws the tokens/s figures as a PNG (matplotlib).

Wall time and peak RSS (sum over the process tree, sampled every 0.1 s; forked children share pages,
so the sum overcounts) are measured from outside; tokens are counted from the written ``.idx``. The
two outputs are compared token for token. Prints a Markdown table; ``--write-docs`` appends it with
date and machine to a file.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_tools.tiny_corpus import save_tokenizer_dir, split_pieces, train_tokenizer  # noqa: E402
from longcat_megatron.data.indexed_files import read_index_summary  # noqa: E402
from longcat_megatron.data.tokenizer import tokenizer_info  # noqa: E402

SHIM = '''import typing
if not hasattr(typing, "override"):
    import typing_extensions
    typing.override = typing_extensions.override
'''


def build_corpus(path: str, megabytes: float) -> None:
    """JSONL of stdlib sources and help topics in 1-50 KB documents, deterministic order."""
    if os.path.isfile(path):
        return
    texts = []
    try:
        from pydoc_data.topics import topics

        texts += [topics[k] for k in sorted(topics)]
    except ImportError:
        pass
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    limit, written = int(megabytes * (1 << 20)), 0
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for text in texts + [open(f, encoding="utf-8", errors="replace").read() for f in files]:
            for piece in split_pieces(text, 16384):
                line = json.dumps({"text": piece}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= limit:
                    break
            if written >= limit:
                break
    os.replace(path + ".tmp", path)


def build_tokenizer(directory: str, corpus: str, vocab: int, sample_mb: float) -> None:
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > sample_mb * (1 << 20):
                break
    save_tokenizer_dir(train_tokenizer(texts, vocab), directory)


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; wall seconds and peak RSS of the process tree (sum and largest process)."""
    start = time.monotonic()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            rss = [p.memory_info().rss for p in procs if p.is_running()]
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": time.monotonic() - start, "rss_sum_mib": peak_sum / 2**20, "rss_max_mib": peak_one / 2**20}


def measure_many(cmds: list[list[str]], env: dict) -> dict:
    """Run ``cmds`` at the same time; wall seconds until all end and the peak RSS of all their trees."""
    start = time.monotonic()
    procs = [psutil.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT) for c in cmds]
    peak_sum = peak_one = 0
    while any(p.poll() is None for p in procs):
        rss = []
        for proc in procs:
            try:
                rss += [q.memory_info().rss for q in [proc] + proc.children(recursive=True) if q.is_running()]
            except psutil.Error:
                pass
        if rss:
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
        time.sleep(0.1)
    seconds = time.monotonic() - start
    for proc, cmd in zip(procs, cmds):
        out = proc.stdout.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {"seconds": seconds, "rss_sum_mib": peak_sum / 2**20, "rss_max_mib": peak_one / 2**20}


def split_corpus(src: str, directory: str, files: int) -> None:
    """``src`` cut at line boundaries into ``files`` JSONL files of about equal size (once)."""
    # beside it (a directory input reads every file); names the source, so another corpus is cut anew
    stamp = f"{directory.rstrip(os.sep)}.complete-{files}-{os.path.basename(src)}-{os.path.getsize(src)}"
    if os.path.isfile(stamp):
        return
    for old in glob.glob(glob.escape(directory.rstrip(os.sep)) + ".complete-*"):
        os.remove(old)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
    total, part, out = os.path.getsize(src), 0, None
    with open(src, "rb") as f:
        for line in f:
            if out is None or (out.tell() >= total / files and part < files):
                if out is not None:
                    out.close()
                out = open(os.path.join(directory, f"part{part:03d}.jsonl"), "wb")
                part += 1
            out.write(line)
    out.close()
    open(stamp, "w").close()


def task_rows(split_dir: str, tokenizer: str, work: str, workers: int, task_counts: list[int], env: dict) -> list:
    """The job-array path at each task count: N tasks at once, then the final step."""
    rows = []
    for n in task_counts:
        prefix = os.path.join(work, f"tasks{n}", "corpus")
        if os.path.isdir(os.path.dirname(prefix)):
            for name in os.listdir(os.path.dirname(prefix)):
                os.remove(os.path.join(os.path.dirname(prefix), name))
        per_task = max(1, workers // n)
        common = [sys.executable, "-m", "data_tools.preprocess", "--input", split_dir, "--tokenizer", tokenizer,
                  "--output-prefix", prefix]
        m = measure_many([common + ["--workers", str(per_task), "--task-index", str(i), "--num-tasks", str(n),
                                    "--quiet"] for i in range(n)], env)
        t0 = time.monotonic()
        measure([*common, "--finalize", "--num-tasks", str(n)], env)
        manifest = json.load(open(prefix + ".manifest.json"))
        rows.append({"tasks": n, "workers": per_task, **m, "finalize_s": time.monotonic() - t0,
                     "tokens": manifest["tokens"], "datasets": [os.path.join(os.path.dirname(prefix), d["prefix"])
                                                                for d in manifest["datasets"]]})
    return rows


def same_dataset_tokens(a: list[str], b: list[str]) -> bool:
    """The datasets ``a`` and ``b`` (in order) hold the same token bytes and document lengths."""
    def concat(prefixes, ext):
        return b"".join(open(p + ext, "rb").read() for p in prefixes)

    from longcat_megatron.data.indexed_files import sequence_lengths

    return concat(a, ".bin") == concat(b, ".bin") and \
        np.array_equal(np.concatenate([sequence_lengths(p) for p in a]), np.concatenate([sequence_lengths(p) for p in b]))


def head_lines(src: str, dst: str, fraction: float) -> None:
    total = os.path.getsize(src)
    with open(src, "rb") as f, open(dst, "wb") as out:
        for line in f:
            out.write(line)
            if out.tell() >= total * fraction:
                break


def same_tokens(prefix_a: str, prefix_b: str) -> bool:
    a, b = read_index_summary(prefix_a), read_index_summary(prefix_b)
    if a["dtype"] != b["dtype"] or a["tokens"] != b["tokens"] or a["sequences"] != b["sequences"]:
        return False
    return np.array_equal(np.fromfile(prefix_a + ".bin", dtype=np.uint8), np.fromfile(prefix_b + ".bin", dtype=np.uint8))


def plot_rates(path: str, rows: list, tasks: list, workers: int) -> None:
    from longcat_megatron.plotting import Panel, plot_panels

    panels = [Panel(f"Tokenizing one corpus ({workers} worker processes)", "tokens/s",
                    {r["tool"].replace("Megatron-LM tools/preprocess_data.py", "Megatron-LM\npreprocess_data.py"):
                     r["tokens"] / r["seconds"] for r in rows}, kind="bar", value_format="{:,.0f}", yformat="eng")]
    if tasks:
        series = {f"{t['tasks']} task{'s' if t['tasks'] > 1 else ''} x {t['workers']} worker(s)":
                  {"all tasks together": t["tokens"] / t["seconds"],
                   "per task": t["tokens"] / t["seconds"] / t["tasks"]} for t in tasks}
        panels.append(Panel(f"Job-array path, all tasks on this machine", "tokens/s", series, kind="bar",
                            value_format="{:,.0f}", yformat="eng"))
    plot_panels(path, panels, cols=2, panel_size=(6.0, 3.8))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/preprocess.py", description=__doc__.split("Example::")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/longcat_bench_preprocess", help="work directory (reused)")
    parser.add_argument("--corpus", help="JSONL corpus (default: build one from the stdlib)")
    parser.add_argument("--corpus-mb", type=float, default=40.0, help="size of the built corpus")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train a 32k BPE)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mlm", help="Megatron-LM checkout (runs its tools/preprocess_data.py)")
    parser.add_argument("--mlm-pythonpath", default="", help="extra import paths for Megatron-LM (e.g. triton)")
    parser.add_argument("--write-docs", help="append the result table to this Markdown file")
    parser.add_argument("--tasks", type=int, nargs="*", default=[1, 2],
                        help="task counts of the job-array path to compare (default 1 2; none: skip it)")
    parser.add_argument("--files", type=int, default=8, help="input files the corpus is cut into for the tasks")
    parser.add_argument("--plot", help="write the tokens/s figures as a PNG here")
    args = parser.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    corpus = args.corpus or os.path.join(args.work, f"corpus_{args.corpus_mb:g}mb.jsonl")
    if not args.corpus:
        build_corpus(corpus, args.corpus_mb)
    tokenizer = args.tokenizer or os.path.join(args.work, "tokenizer32k")
    if not args.tokenizer:
        build_tokenizer(tokenizer, corpus, 32000, sample_mb=min(10.0, args.corpus_mb / 2))
    quarter = os.path.join(args.work, "corpus_quarter.jsonl")
    head_lines(corpus, quarter, 0.25)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    rows = []
    for name, src in (("ours, 1/4 corpus", quarter), ("ours", corpus)):
        prefix = os.path.join(args.work, "ours" if src == corpus else "ours_quarter")
        m = measure([sys.executable, "-m", "data_tools.preprocess", "--input", src, "--tokenizer", tokenizer,
                     "--output-prefix", prefix, "--workers", str(args.workers), "--quiet"], env)
        rows.append({"tool": name, "input_mb": os.path.getsize(src) / 2**20, **m,
                     "tokens": read_index_summary(prefix)["tokens"], "prefix": prefix})
    if args.mlm:
        shim = os.path.join(args.work, "shim")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(SHIM)
        mlm_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (shim, args.mlm, args.mlm_pythonpath) if p)}
        prefix = os.path.join(args.work, "mlm")
        m = measure([sys.executable, os.path.join(args.mlm, "tools", "preprocess_data.py"), "--input", corpus,
                     "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                     tokenizer, "--workers", str(args.workers), "--append-eod", "--log-interval", "100000"], mlm_env)
        prefix += "_text_document"
        rows.append({"tool": "Megatron-LM tools/preprocess_data.py", "input_mb": os.path.getsize(corpus) / 2**20,
                     **m, "tokens": read_index_summary(prefix)["tokens"], "prefix": prefix})
        identical = same_tokens(rows[1]["prefix"], prefix)
    else:
        identical = None

    lines = [
        "| tool | input MiB | wall s | tokens | tokens/s | peak RSS tree MiB | largest process MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['input_mb']:.1f} | {r['seconds']:.1f} | {r['tokens']:,} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {r['rss_sum_mib']:,.0f} | {r['rss_max_mib']:,.0f} |")
    tasks = []
    if args.tasks:
        split_dir = os.path.join(args.work, "split")
        split_corpus(corpus, split_dir, args.files)
        tasks = task_rows(split_dir, tokenizer, args.work, args.workers, args.tasks, env)
        # the same documents as the single-file run, in the same order, whatever the task count
        same = all(same_dataset_tokens([rows[1]["prefix"]], t["datasets"]) for t in tasks)
        lines += ["", f"Job-array path (`--task-index/--num-tasks`, then `--finalize`) on the corpus cut into "
                      f"{args.files} files, all tasks at once on this machine ({args.workers} worker processes "
                      f"shared among them); datasets token-identical to the single-file run at every task count: {same}.", "",
                  "| tasks | workers per task | wall s (all tasks) | tokens | tokens/s (all tasks) | tokens/s per task "
                  "| final step s | peak RSS all tasks MiB |", "|---|---|---|---|---|---|---|---|"]
        for t in tasks:
            rate = t["tokens"] / t["seconds"]
            lines.append(f"| {t['tasks']} | {t['workers']} | {t['seconds']:.1f} | {t['tokens']:,} | {rate:,.0f} | "
                         f"{rate / t['tasks']:,.0f} | {t['finalize_s']:.1f} | {t['rss_sum_mib']:,.0f} |")
    table = "\n".join(lines)
    cpu = platform.processor() or platform.machine()
    header = (f"## Preprocessing: ours vs Megatron-LM tools/preprocess_data.py ({datetime.date.today()})\n\n"
              f"Machine: {os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
              f"Python {platform.python_version()}; {args.workers} workers each; corpus {os.path.basename(corpus)}, "
              f"tokenizer {os.path.basename(tokenizer)} (vocab {tokenizer_info(tokenizer).vocab_size}). "
              f"Command: `python bench/preprocess.py --workers {args.workers} --corpus-mb {args.corpus_mb:g}"
              f"{' --mlm MEGATRON_LM' if args.mlm else ''}"
              f"{' --tasks ' + ' '.join(map(str, args.tasks)) if args.tasks else ''}`. "
              f"Outputs token-identical: {identical}.\n")
    print(header)
    print(table)
    if args.write_docs:
        with open(args.write_docs, "a") as f:
            f.write("\n" + header + "\n" + table + "\n")
    if args.plot:
        plot_rates(args.plot, rows, tasks, args.workers)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
