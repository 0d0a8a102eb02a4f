"""Where a run stands: ``python -m longcat_megatron.status RUN_DIR [--png FILE] [--no-png]``.

RUN_DIR is a stage's checkpoint directory (``checkpoint.save``; CKPT_DIR of the stage scripts).
Printed: the stage (from the last checkpoint's ``run_config.yaml``: sequence length, batch, RoPE),
the last committed checkpoint (iteration, time, path), the latest logged iteration, tokens trained,
loss, speed and ETA (from the TensorBoard logs), and the launches (``logs/events.log`` written by
launch/rank.sh: starts, requeues = exit 75, failures = other non-zero exits). A PNG of the curves
(loss with tokens on a second axis, LR, gradient norm, throughput, MFU, memory, expert load per layer,
FFN experts per token against the budget target; :func:`curve_panels`, drawn with matplotlib by
:mod:`longcat_megatron.plotting`) and a CSV of every logged scalar are written next to the logs.

TensorBoard logs are looked for in the run config's ``logging.tensorboard_dir``, then in
RUN_DIR/tensorboard. Exit codes: 0, 2 when RUN_DIR is not a run directory.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from longcat_megatron.errors import UserInputError
from longcat_megatron.training.checkpointing import (
    CONFIG_NAME, TRACKER, iteration_dir, list_iterations, read_tracker,
)
from longcat_megatron.training.signals import EXIT_REQUEUE


@dataclass
class Launches:
    """What ``logs/events.log`` says about the launches of this run."""

    starts: int = 0
    requeues: int = 0  # exits with 75: saved and stopped early (signal, time limit)
    failures: list = field(default_factory=list)  # (time, rc, job) of other non-zero exits
    last: Optional[str] = None


@dataclass
class RunStatus:
    run_dir: str
    stage: str = "-"
    committed_iteration: Optional[int] = None
    committed_path: Optional[str] = None
    committed_time: Optional[float] = None
    train_iters: Optional[int] = None
    iteration: Optional[int] = None
    tokens: Optional[float] = None
    token_budget: Optional[float] = None
    loss: Optional[float] = None
    valid_loss: Optional[float] = None
    seconds_per_iter: Optional[float] = None
    tensorboard_dir: Optional[str] = None
    launches: Launches = field(default_factory=Launches)
    scalars: dict = field(default_factory=dict, repr=False)  # tag -> (steps, values, wall times)
    evaluation: Optional[dict] = None  # the latest RUN_DIR/eval/iter_*/scores.json (longcat_megatron.evaluate)
    stability: dict = field(default_factory=dict)  # RUN_DIR/stability.json (training/stability.py)
    sdc: list = field(default_factory=list)  # RUN_DIR/sdc.jsonl (training/sdc.py): suspect ranks

    @property
    def eta_seconds(self) -> Optional[float]:
        if self.seconds_per_iter is None or self.train_iters is None or self.iteration is None:
            return None
        return max(0, self.train_iters - self.iteration) * self.seconds_per_iter


def _run_config(iter_dir: str) -> dict:
    import yaml

    path = os.path.join(iter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        return yaml.safe_load(open(path)) or {}
    except yaml.YAMLError:
        return {}


def _consumed_samples(iter_dir: str) -> Optional[int]:
    """consumed_train_samples from the checkpoint's common state (common.pt), if readable."""
    path = os.path.join(iter_dir, "common.pt")
    if not os.path.isfile(path):
        return None
    try:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        return int(state["consumed_train_samples"])
    except Exception:  # noqa: BLE001 - an unreadable common.pt only costs the tokens figure
        return None


def read_events(path: str) -> Launches:
    """Parse launch/rank.sh's events.log (``TIME start job=.. restart=..`` / ``TIME exit rc=N job=..``)."""
    out = Launches()
    if not os.path.isfile(path):
        return out
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) < 2:
            continue
        if parts[1] == "start":
            out.starts += 1
        elif parts[1] == "exit":
            m = re.search(r"rc=(\d+)", line)
            rc = int(m.group(1)) if m else -1
            if rc == EXIT_REQUEUE:
                out.requeues += 1
            elif rc != 0:
                job = " ".join(p for p in parts[3:] if p.startswith(("job=", "restart=")))
                out.failures.append((parts[0], rc, job))
        out.last = line.strip()
    return out


def read_scalars(tb_dir: str) -> dict:
    """tag -> (steps, values, wall times) of every scalar in the TensorBoard event files under
    ``tb_dir`` (later files win for repeated steps: a resumed run rewrites its last steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict = {}
    files = sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True),
                   key=os.path.getmtime)
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = merged.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                series[ev.step] = (ev.value, ev.wall_time)
    out = {}
    for tag, series in merged.items():
        steps = sorted(series)
        out[tag] = (steps, [series[s][0] for s in steps], [series[s][1] for s in steps])
    return out


def collect(run_dir: str) -> RunStatus:
    """Everything :func:`render` prints, from the files of ``run_dir``."""
    if not os.path.isdir(run_dir):
        raise UserInputError(f"run directory '{run_dir}' does not exist (pass a stage's checkpoint "
                             "directory, CKPT_DIR / checkpoint.save)")
    st = RunStatus(run_dir=os.path.abspath(run_dir))
    cfg: dict = {}
    committed = read_tracker(run_dir)
    if committed is not None:
        st.committed_iteration = committed
        st.committed_path = iteration_dir(run_dir, committed)
        if os.path.isdir(st.committed_path):
            st.committed_time = os.path.getmtime(os.path.join(st.committed_path, "metadata.json")) \
                if os.path.isfile(os.path.join(st.committed_path, "metadata.json")) \
                else os.path.getmtime(st.committed_path)
            cfg = _run_config(st.committed_path)
            consumed = _consumed_samples(st.committed_path)
            seq = (cfg.get("data") or {}).get("seq_length")
            if consumed is not None and seq:
                st.tokens = float(consumed * seq)
    elif not list_iterations(run_dir) and not os.path.isdir(os.path.join(run_dir, "logs")):
        raise UserInputError(f"'{run_dir}' holds no checkpoint ({TRACKER}, iter_*) and no logs/: "
                             "not a run directory yet (has the job started?)")
    train, data, model = cfg.get("train") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    if cfg:
        st.train_iters = train.get("train_iters")
        rope = {"rope": "plain"}.get(model.get("rope_type", "?"), model.get("rope_type", "?"))
        if rope == "yarn":
            rope += f" x{model.get('yarn_factor')} over {model.get('yarn_original_max_position_embeddings')}"
        base = model.get("rotary_base", "?")
        base = f"{base:g}" if isinstance(base, (int, float)) else base
        st.stage = (f"{os.path.basename(os.path.normpath(run_dir))}: seq {data.get('seq_length')}, global batch "
                    f"{train.get('global_batch_size')}, {st.train_iters} iterations, RoPE {rope} base {base}")
        if data.get("seq_length") and train.get("global_batch_size") and st.train_iters:
            from longcat_megatron.training.batch_schedule import samples_for_iterations

            st.token_budget = float(samples_for_iterations(
                st.train_iters, train["global_batch_size"], train.get("batch_schedule") or [],
                data["seq_length"]) * data["seq_length"])
    tb = (cfg.get("logging") or {}).get("tensorboard_dir")
    for cand in (tb, os.path.join(run_dir, "tensorboard")):
        if cand and os.path.isdir(cand):
            st.tensorboard_dir = cand
            break
    if st.tensorboard_dir:
        st.scalars = read_scalars(st.tensorboard_dir)
        if "loss" in st.scalars:
            steps, values, walls = st.scalars["loss"]
            st.iteration, st.loss = steps[-1], values[-1]
            window = [i for i in range(len(steps)) if steps[i] > steps[-1] - 50]
            if len(window) >= 2:
                i0, i1 = window[0], window[-1]
                if steps[i1] > steps[i0] and walls[i1] > walls[i0]:
                    st.seconds_per_iter = (walls[i1] - walls[i0]) / (steps[i1] - steps[i0])
        if "valid/loss" in st.scalars:
            st.valid_loss = st.scalars["valid/loss"][1][-1]
        if "tokens" in st.scalars and (st.tokens is None or st.scalars["tokens"][0][-1] >= (st.committed_iteration or 0)):
            st.tokens = st.scalars["tokens"][1][-1]
    if st.iteration is None:
        st.iteration = st.committed_iteration
    st.launches = read_events(os.path.join(run_dir, "logs", "events.log"))
    from longcat_megatron.training.stability import read_records

    st.stability = read_records(run_dir)
    if os.path.exists(os.path.join(run_dir, "sdc.jsonl")):  # (training/sdc.py imports torch: only then)
        from longcat_megatron.training.sdc import read_records as read_sdc_records

        st.sdc = read_sdc_records(run_dir)
    scored = sorted(glob.glob(os.path.join(run_dir, "eval", "iter_*", "scores.json")))
    if scored:
        try:
            import json

            st.evaluation = json.load(open(scored[-1]))
        except (OSError, ValueError):
            pass
    return st


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, _ = divmod(rem, 60)
    return f"{d}d {h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m"


def render(st: RunStatus) -> str:
    """The status block."""
    def tok(n):
        from longcat_megatron.training.progress import _fmt_count

        return _fmt_count(n) if n is not None else "-"

    lines = [f"run: {st.run_dir}", f"stage: {st.stage}"]
    if st.committed_iteration is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.committed_time)) if st.committed_time else "?"
        lines.append(f"last committed checkpoint: iteration {st.committed_iteration} ({when}) {st.committed_path}")
    else:
        lines.append("last committed checkpoint: none")
    total = f"/{st.train_iters}" if st.train_iters else ""
    lines.append(f"iteration: {st.iteration if st.iteration is not None else '-'}{total}"
                 + (f" ({st.iteration / st.train_iters:.1%})" if st.iteration and st.train_iters else ""))
    lines.append(f"tokens: {tok(st.tokens)}" + (f" of {tok(st.token_budget)}" if st.token_budget else ""))
    loss = f"{st.loss:.4f}" if st.loss is not None else "-"
    if st.valid_loss is not None:
        loss += f" (validation {st.valid_loss:.4f})"
    lines.append(f"loss: {loss}")
    if st.seconds_per_iter is not None:
        lines.append(f"speed: {st.seconds_per_iter:.3f} s/it; ETA {_dur(st.eta_seconds)} of training "
                     "(excluding queue time and restarts)")
    else:
        lines.append("speed/ETA: - (no TensorBoard loss logged yet)")
    la = st.launches
    lines.append(f"launches: {la.starts} start(s), {la.requeues} requeue(s) (exit 75), "
                 f"{len(la.failures)} failure(s)")
    for when, rc, job in la.failures[-5:]:
        meaning = EXIT_MEANINGS.get(rc)
        lines.append(f"  failure: exit {rc} at {when} ({job})" + (f": {meaning}" if meaning else ""))
    lines += stability_lines(st)
    if la.last:
        lines.append(f"  last event: {la.last}")
    if st.evaluation:
        ev = st.evaluation
        lines.append(f"evaluation (lm_eval, iteration {ev.get('iteration')}): " + "; ".join(
            f"{task} " + " ".join(f"{m} {v:.4g}" for m, v in metrics.items() if not m.endswith("_stderr"))
            for task, metrics in (ev.get("scores") or {}).items()) + f" ({os.path.join(st.run_dir, 'eval')})")
    if not st.tensorboard_dir:
        lines.append("tensorboard: none found (set logging.tensorboard_dir; the stage scripts default "
                     "it to CKPT_DIR/tensorboard)")
    return "\n".join(lines)


EXIT_MEANINGS = {
    2: "bad input (config, data or environment; the message is in the job log); not requeued",
    76: "hang: the watchdog dumped the Python stacks (logs/hang-stacks-rank*.txt) and exited",
    77: "stopped for instability: too many non-finite or loss-spike steps (the job log's [stability] "
        "lines name iterations and data positions); not requeued: an operator must act",
    78: "silent data corruption detected: a step computed differently when replayed; the job is requeued "
        "without the suspect node (sdc.jsonl in the run directory names rank, host, iteration); "
        "MAX_SDC_REQUEUES",
}


def stability_lines(st: RunStatus) -> list:
    """Router stability (latest R_g / expert cosine over the layers), rollbacks, instability stops,
    silent-data-corruption suspects."""
    lines = []
    for tag, name in (("grad_balance", "R_g (bound 0.1)"), ("expert_cosine", "expert cosine")):
        latest = {k: v[1][-1] for k, v in st.scalars.items()
                  if k.startswith("moe/layer") and k.endswith("/" + tag)}
        if latest:
            worst = max(latest, key=lambda k: latest[k])
            lines.append(f"router {name}: max {latest[worst]:.3g} ({worst.split('/')[1]}), "
                         f"mean {sum(latest.values()) / len(latest):.3g} over {len(latest)} layer(s)")
    for r in (st.stability or {}).get("rollbacks", []):
        lines.append(f"  rollback {r['number']}: iterations {r['skip_from']}..{r['skip_to']} skipped "
                     f"({r['reason']})")
    stops = (st.stability or {}).get("stops", [])
    if stops:
        lines.append(f"  instability stop at iteration {stops[-1]['iteration']}: {stops[-1]['message']}")
    for r in st.sdc[-5:]:
        lines.append(f"  silent data corruption at iteration {r['iteration']}: rank {r['rank']} on host "
                     f"{r['host']} (job {r.get('job') or '-'}): {r['fault']}")
    return lines


def curve_panels(st: RunStatus, run_config: Optional[dict] = None) -> list:
    """The status figure's panels (those with data): loss, LR, gradient norm, throughput, MFU or
    TFLOP/s, memory, expert load, FFN experts per token."""
    from longcat_megatron.plotting import Panel, count, monotone_axis

    sc = st.scalars
    model = (run_config or {}).get("model") or {}

    def pick(*tags):
        return {name: sc[tag][:2] for name, tag in tags if tag in sc}

    top = None
    if "tokens" in sc:
        axis = monotone_axis(*sc["tokens"][:2])
        if axis is not None:
            top = ("tokens trained", *axis, count)
    panels = [
        Panel("Loss", "cross-entropy (nats/token)", pick(("train", "loss"), ("validation", "valid/loss")),
              top_axis=top),
        Panel("Learning rate", "learning rate", pick(("lr", "lr")), ymin=0.0, yformat="sci"),
        Panel("Gradient norm", "global L2 norm (before clipping)", pick(("grad norm", "grad_norm"))),
        Panel("Throughput", "tokens/s (all ranks)", pick(("tokens/s", "throughput/tokens_per_s")), ymin=0.0,
              yformat="eng"),
    ]
    if "throughput/mfu" in sc:
        steps, mfu = sc["throughput/mfu"][:2]
        panels.append(Panel("Model FLOPs utilisation", "MFU (% of the GPU's dense BF16 peak)",
                            {"MFU": (steps, [100 * v for v in mfu])}, ymin=0.0))
    elif "throughput/tflops_per_gpu" in sc:
        steps, tflops = sc["throughput/tflops_per_gpu"][:2]
        panels.append(Panel("Achieved model FLOP/s", "FLOP/s per rank (model FLOPs)",
                            {"per rank": (steps, [v * 1e12 for v in tflops])}, ymin=0.0, yformat="eng"))
    if "throughput/peak_mem_gb" in sc:
        panels.append(Panel("Peak memory of rank 0", "GB (CUDA peak allocated; CPU: peak RSS)",
                            pick(("rank 0", "throughput/peak_mem_gb")), ymin=0.0))
    layers = sorted({int(m.group(1)) for t in sc for m in [re.match(r"^moe/layer(\d+)/load_max_over_mean$", t)] if m})
    load = {}
    for i in layers:
        load[f"layer {i} max/mean"] = (*sc[f"moe/layer{i}/load_max_over_mean"][:2], {"group": i, "label": f"layer {i}"})
        if f"moe/layer{i}/load_min_over_mean" in sc:
            load[f"layer {i} min/mean"] = (*sc[f"moe/layer{i}/load_min_over_mean"][:2],
                                           {"group": i, "linestyle": "--"})
    if not load and "progress/max-load" in sc:
        load["max over layers, max/mean"] = sc["progress/max-load"][:2]
    if load:
        panels.append(Panel("Expert load balance (FFN experts)", "tokens per expert / mean (ratio)", load,
                            ymin=0.0, logy=False, group_label="layer",
                            reference=[(1.0, "balanced (= 1)", dict(color="tab:red", linestyle=":"))],
                            styles=[("busiest expert / mean", "-"), ("idlest expert / mean", "--")]))
    experts = {f"layer {i}": (*sc[f"moe/layer{i}/ffn_experts_per_token"][:2], {"group": i}) for i in layers
               if f"moe/layer{i}/ffn_experts_per_token" in sc}
    if not experts and "progress/experts/tok" in sc:
        experts = {"mean over layers": sc["progress/experts/tok"][:2]}
    if experts:
        ref = []
        if model.get("budget_target_ffn_experts"):
            ref.append((float(model["budget_target_ffn_experts"]),
                        f"budget target {model['budget_target_ffn_experts']:g}"))
        if model.get("moe_router_topk"):
            ref.append((float(model["moe_router_topk"]), f"top-k = {model['moe_router_topk']} (no zero experts)"))
        panels.append(Panel("FFN experts per token (zero experts excluded)", "experts per token", experts,
                            ymin=0.0, logy=False, reference=ref, group_label="layer"))
    scores = {t[len("eval/"):]: sc[t][:2] for t in sorted(sc) if t.startswith("eval/") and "_stderr" not in t
              and all(0.0 <= v <= 1.0 for v in sc[t][1])}
    if scores:
        panels.append(Panel("Benchmark scores (lm_eval, python -m longcat_megatron.evaluate)",
                            "score (0 to 1; brier_score: lower is better)", scores, ymin=0.0, logy=False))
    return [p for p in panels if p.series]


CSV_MAX_ROWS = 100_000


def write_curves_csv(st: RunStatus, path: str, tags: list[str]) -> int:
    """The curves as CSV: ``iteration`` and one column per TensorBoard tag (empty where a tag has no
    value at that iteration); runs longer than CSV_MAX_ROWS iterations are thinned evenly (the last
    kept). Returns the number of rows."""
    import csv

    values = {tag: dict(zip(*st.scalars[tag][:2])) for tag in tags if tag in st.scalars}
    steps = sorted({s for v in values.values() for s in v})
    if len(steps) > CSV_MAX_ROWS:
        stride = -(-len(steps) // CSV_MAX_ROWS)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *values])
        for step in steps:
            w.writerow([step, *(repr(v[step]) if step in v else "" for v in values.values())])
    os.replace(tmp, path)
    return len(steps)


def write_curves(st: RunStatus, path: str, csv_path: Optional[str] = None) -> bool:
    """PNG of the run's curves (matplotlib, :func:`curve_panels`) and, with ``csv_path``, every
    TensorBoard scalar of the run as CSV; False when there is nothing to plot."""
    from longcat_megatron.plotting import plot_panels

    if not st.scalars:
        return False
    cfg = _run_config(st.committed_path) if st.committed_path and os.path.isdir(st.committed_path) else {}
    panels = curve_panels(st, cfg)
    if not panels:
        return False
    title = f"{st.stage}" if st.stage != "-" else os.path.basename(st.run_dir)
    if st.iteration is not None:
        title += f"  |  iteration {st.iteration}" + (f"/{st.train_iters}" if st.train_iters else "")
    plot_panels(path, panels, title=title, cols=2)
    if csv_path:
        write_curves_csv(st, csv_path, sorted(st.scalars))
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_megatron.status",
                                description="Print where a training run stands and plot its curves.")
    p.add_argument("run_dir", help="the stage's checkpoint directory (CKPT_DIR / checkpoint.save)")
    p.add_argument("--png", default=None, help="where to write the curves (default: RUN_DIR/logs/curves.png)")
    p.add_argument("--csv", default=None,
                   help="where to write every logged scalar as CSV (default: the PNG's path with .csv)")
    p.add_argument("--no-png", action="store_true", help="print only (no PNG, no CSV)")
    args = p.parse_args(argv)
    try:
        st = collect(args.run_dir)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(st))
    if not args.no_png:
        path = args.png or os.path.join(args.run_dir, "logs", "curves.png")
        csv_path = args.csv or os.path.splitext(path)[0] + ".csv"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if write_curves(st, path, csv_path):
            print(f"curves: {path} (values: {csv_path})")
        else:
            print("curves: nothing to plot (no TensorBoard scalars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
