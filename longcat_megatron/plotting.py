"""Charts as PNG files with matplotlib (Agg, no display; no pyplot global state).

:func:`plot_panels` draws a grid of :class:`Panel` s, each titled, with labelled axes (units in the
labels), a legend, a log scale where the data span more than ~30x (or as asked), a fixed lower
bound for quantities that cannot be negative, reference lines (e.g. "balanced = 1"), and
optionally a second x axis on top (e.g. tokens over iterations). Line panels take ``{name: (xs,
ys)}`` or ``{name: (xs, ys, {"group": g, "linestyle": "--"})}``: series of one group share a colour
(with many groups, e.g. one per layer, a colour bar replaces the legend); bar panels take
``{name: value}``. Used by ``python -m longcat_megatron.status`` and the benches (``--plot FILE``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

MAX_POINTS = 20000  # per series; longer series are thinned evenly for drawing (the last point kept)


@dataclass
class Panel:
    title: str
    ylabel: str
    series: dict  # line: {name: (xs, ys)}; bar: {name: value}
    xlabel: str = "iteration"
    kind: str = "line"  # "line" | "bar"
    logy: Optional[bool] = None  # None: log when the positive values span more than 30x
    logx: bool = False
    ymin: Optional[float] = None  # e.g. 0 for ratios and counts (never a padded negative axis)
    reference: Sequence[tuple] = ()  # (y, label) horizontal reference lines
    top_axis: Optional[tuple] = None  # (label, forward(x), inverse(v)[, format(v)]): a second x axis on top
    value_format: str = "{:,.3g}"  # bar labels
    yformat: Optional[str] = None  # "eng": 1.8M-style ticks; "sci": 3e-04-style
    group_label: str = "group"  # the colour bar's label when series carry many groups
    styles: Sequence[tuple] = ()  # (label, linestyle) legend entries explaining line styles


def thin(xs, ys, limit: int = MAX_POINTS):
    """At most ``limit`` evenly spaced points of (xs, ys), the last one always kept."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if xs.size <= limit:
        return xs, ys
    idx = np.unique(np.append(np.linspace(0, xs.size - 1, limit).astype(int), xs.size - 1))
    return xs[idx], ys[idx]


def _wants_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return v.size > 1 and v.size == values[np.isfinite(values)].size and v.max() / v.min() > 30


def _colors(n: int):
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


_REF_STYLES = [dict(color="0.25", linestyle="--"), dict(color="tab:red", linestyle=":"),
               dict(color="tab:purple", linestyle="-.")]


def _draw_line(ax, p: Panel) -> None:
    names = list(p.series)
    opts = {n: (p.series[n][2] if len(p.series[n]) > 2 else {}) for n in names}
    groups = list(dict.fromkeys(opts[n].get("group", n) for n in names))
    colors = dict(zip(groups, _colors(len(groups))))
    many = len(groups) > 10
    shown: set = set()
    allv = []
    for name in names:
        xs, ys = thin(*p.series[name][:2])
        good = np.isfinite(ys)
        if not good.any():
            continue
        allv.append(ys[good])
        o = dict(opts[name])
        group, label = o.pop("group", name), o.pop("label", name)
        if many or group in shown:  # one legend entry per group; many groups: the colour bar
            label = None
        shown.add(group)
        style = dict(marker="o", markersize=3) if good.sum() < 30 else {}
        ax.plot(xs[good], ys[good], color=colors[group], linewidth=1.3, label=label, **{**style, **o})
    if not allv:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
        return
    if many:  # one colour per group (e.g. layer) on a continuous scale: a colour bar, not 50 legend rows
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        numeric = [g for g in groups if isinstance(g, (int, float))]
        lo, hi = (min(numeric), max(numeric)) if numeric else (0, len(groups) - 1)
        bar = ax.figure.colorbar(ScalarMappable(Normalize(lo, hi), colormaps["viridis"]), ax=ax, pad=0.01)
        bar.set_label(p.group_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    values = np.concatenate(allv)
    logy = p.logy if p.logy is not None else (p.ymin is None and _wants_log(values))
    if logy:
        ax.set_yscale("log")
    elif p.ymin is not None:
        top = max([float(values.max())] + [float(r[0]) for r in p.reference])
        ax.set_ylim(p.ymin, top + 0.08 * max(top - p.ymin, 1e-12))
    if p.logx:
        ax.set_xscale("log")
    for i, (y, label, *rest) in enumerate(p.reference):
        ax.axhline(y, linewidth=1.1, label=label, **(rest[0] if rest else _REF_STYLES[i % len(_REF_STYLES)]))
    if p.top_axis is not None:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        label, forward, inverse, *fmt = p.top_axis
        top = ax.secondary_xaxis("top", functions=(forward, inverse))
        top.set_xlabel(label, fontsize=9)
        top.tick_params(labelsize=8)
        top.xaxis.set_major_locator(MaxNLocator(6))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: (fmt[0] if fmt else "{:,.4g}".format)(v)))


def _draw_bar(ax, p: Panel) -> None:
    """``{name: value}`` bars, or ``{category: {part: value}}`` grouped bars with a legend of parts."""
    names = list(p.series)
    grouped = isinstance(p.series[names[0]], dict) if names else False
    parts = list(dict.fromkeys(k for n in names for k in p.series[n])) if grouped else [None]
    width = 0.8 / len(parts)
    colors = _colors(len(parts) if grouped else len(names))
    values = []
    for j, part in enumerate(parts):
        xs = [i + (j - (len(parts) - 1) / 2) * width for i in range(len(names))]
        vals = [float(p.series[n].get(part, np.nan)) if grouped else float(p.series[n]) for n in names]
        values += [v for v in vals if np.isfinite(v)]
        bars = ax.bar(xs, vals, width=width * 0.95, label=part if grouped else None,
                      color=colors[j] if grouped else colors)
        for bar, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(p.value_format.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)), names, fontsize=9)
    if p.logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(values + [0]) * 1.15 or 1)
    for i, (y, label, *rest) in enumerate(p.reference):
        ax.axhline(y, linewidth=1.1, label=label, **(rest[0] if rest else _REF_STYLES[i % len(_REF_STYLES)]))


def _plain_log_ticks(axis, values=None) -> None:
    """Log-axis ticks as plain numbers (1, 2, 5, 10, 20 ... or the data's own x values), not 2x10^1."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    values = sorted(set(values)) if values is not None else None
    if values and len(values) <= 12:
        axis.set_major_locator(FixedLocator(values))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
    axis.set_minor_formatter(NullFormatter())


def _format_y(ax, how: Optional[str]) -> None:
    from matplotlib.ticker import EngFormatter, ScalarFormatter

    if how == "eng":
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    elif how == "sci":
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-2, 3))
        ax.yaxis.set_major_formatter(fmt)


def plot_panels(path: str, panels: Sequence[Panel], title: Optional[str] = None, cols: int = 2,
                panel_size: tuple = (6.4, 3.6), dpi: int = 110) -> str:
    """Write ``panels`` as one PNG grid (``cols`` columns) to ``path``; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(panels)
    cols = max(1, min(cols, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows + (0.5 if title else 0)), dpi=dpi,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        (_draw_bar if p.kind == "bar" else _draw_line)(ax, p)
        ax.set_title(p.title, fontsize=11, loc="left")
        ax.set_xlabel(p.xlabel if p.kind != "bar" else "", fontsize=9)
        ax.set_ylabel(p.ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
        if p.kind != "bar" and not p.logx:
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        if ax.get_yscale() == "linear":
            _format_y(ax, p.yformat)
        else:
            _plain_log_ticks(ax.yaxis)
        if ax.get_xscale() == "log":
            xs = [float(x) for v in p.series.values() for x in v[0]] if p.kind != "bar" else None
            _plain_log_ticks(ax.xaxis, xs)
        handles, labels = ax.get_legend_handles_labels()
        if p.styles:
            from matplotlib.lines import Line2D

            handles += [Line2D([], [], color="0.2", linestyle=ls, linewidth=1.3) for _, ls in p.styles]
            labels += [label for label, _ in p.styles]
        if len(labels) > 1 or p.reference or p.styles:  # one line needs no legend: the title says it
            ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.savefig(path)
    return path


def count(v: float) -> str:
    """1234567 -> '1.23M' (k, M, B, T): token counts on an axis."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def monotone_axis(xs, vs) -> Optional[tuple[Callable, Callable]]:
    """(forward, inverse) interpolating between two increasing sequences (e.g. iteration -> tokens),
    extended linearly past the ends, for :attr:`Panel.top_axis`; None when they are not both
    increasing or have fewer than two points."""
    xs, vs = np.asarray(xs, dtype=float), np.asarray(vs, dtype=float)
    if xs.size < 2 or np.any(np.diff(xs) <= 0) or np.any(np.diff(vs) <= 0):
        return None

    def interp(x, a, b):
        x = np.asarray(x, dtype=float)
        y = np.interp(x, a, b)
        lo, hi = (b[1] - b[0]) / (a[1] - a[0]), (b[-1] - b[-2]) / (a[-1] - a[-2])
        return np.where(x < a[0], b[0] + (x - a[0]) * lo, np.where(x > a[-1], b[-1] + (x - a[-1]) * hi, y))

    return (lambda x: interp(x, xs, vs)), (lambda v: interp(v, vs, xs))
