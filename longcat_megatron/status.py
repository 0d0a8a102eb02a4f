"""Where a run stands: ``python -m longcat_megatron.status RUN_DIR [--png FILE] [--no-png]``.

RUN_DIR is a stage's checkpoint directory (``checkpoint.save``; CKPT_DIR of the stage scripts).
Printed: the stage (from the last checkpoint's ``run_config.yaml``: sequence length, batch, RoPE),
the last committed checkpoint (iteration, time, path), the latest logged iteration, tokens trained,
loss, speed and ETA (from the TensorBoard logs), and the launches (``logs/events.log`` written by
launch/rank.sh: starts, requeues = exit 75, failures = other non-zero exits). A PNG of the loss and
expert-load curves (TensorBoard scalars ``loss``, ``valid/loss``, ``progress/max-load``,
``moe/layerN/load_max_over_mean``, ``progress/experts/tok``) is written next to the logs, with
numpy + zlib only (:mod:`longcat_megatron.plotting`).

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
        rope = model.get("rope_type", "?")
        if rope == "yarn":
            rope += f" x{model.get('yarn_factor')} over {model.get('yarn_original_max_position_embeddings')}"
        st.stage = (f"{os.path.basename(os.path.normpath(run_dir))}: seq {data.get('seq_length')}, global batch "
                    f"{train.get('global_batch_size')}, {st.train_iters} iterations, RoPE {rope} "
                    f"base {model.get('rotary_base', '?')}")
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
        lines.append(f"  failure: exit {rc} at {when} ({job})")
    if la.last:
        lines.append(f"  last event: {la.last}")
    if not st.tensorboard_dir:
        lines.append("tensorboard: none found (set logging.tensorboard_dir; the stage scripts default "
                     "it to CKPT_DIR/tensorboard)")
    return "\n".join(lines)


def write_curves(st: RunStatus, path: str) -> bool:
    """PNG of loss and expert-load curves; False when there is nothing to plot."""
    from longcat_megatron.plotting import line_chart_png

    sc = st.scalars
    if not sc:
        return False
    loss = {name: sc[tag][:2] for name, tag in (("train loss", "loss"), ("validation loss", "valid/loss"))
            if tag in sc}
    load = {}
    if "progress/max-load" in sc:
        load["max load / mean (all layers)"] = sc["progress/max-load"][:2]
    for tag in sorted(t for t in sc if re.match(r"^moe/layer\d+/load_max_over_mean$", t)):
        load[f"layer {tag.split('/')[1][5:]} max/mean"] = sc[tag][:2]
    for tag in sorted(t for t in sc if re.match(r"^moe/layer\d+/load_min_over_mean$", t)):
        load[f"layer {tag.split('/')[1][5:]} min/mean"] = sc[tag][:2]
    experts = {"ffn experts per token": sc["progress/experts/tok"][:2]} if "progress/experts/tok" in sc else {}
    panels = [("loss", loss), ("expert load", load)]
    if experts:
        panels.append(("ffn experts per token", experts))
    line_chart_png(path, panels)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_megatron.status",
                                description="Print where a training run stands and plot its curves.")
    p.add_argument("run_dir", help="the stage's checkpoint directory (CKPT_DIR / checkpoint.save)")
    p.add_argument("--png", default=None, help="where to write the curves (default: RUN_DIR/logs/curves.png)")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args(argv)
    try:
        st = collect(args.run_dir)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(st))
    if not args.no_png:
        path = args.png or os.path.join(args.run_dir, "logs", "curves.png")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if write_curves(st, path):
            print(f"curves: {path}")
        else:
            print("curves: nothing to plot (no TensorBoard scalars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
