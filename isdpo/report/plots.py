"""Figures of a sweep report: over-optimization (win rate and golden reward against sqrt KL), training curves,
win rate against beta, IS diagnostics.

Every function takes the completed runs of one task (``isdpo.report.runs.Run``), a series -> colour mapping
(``series_colours``, shared by all figures so a series has the same colour everywhere) and returns the
matplotlib ``Figure`` it drew (or None: nothing to draw), so callers and tests can inspect it before saving.

A series is one configuration pooled over task instances (``series_label``: ``Run.method``, the loss plus the
swept settings other than the instance key, e.g. "isdpo, log_clip=0.5"). Panels: one column per beta; with
``per_instance=True`` one row per task instance (``Run.instance``). Bands and error bars are 95% Student-t
intervals (``isdpo.report.stats``, the tables' intervals): over seeds; pooled over instances, across the instance
means (instances a random sample, df K - 1). What the panels hold:

- win rate (golden reward) against sqrt KL: every evaluation point (small, translucent; rasterized in the SVG)
  and per series the mean in equal-count bins of sqrt KL over that series' points, with its band; one x-range;
- against step: per series the mean at each evaluation step every run of the series has, with its band, a
  marker on the last point, thin per-seed lines with ``show_seeds=True``; shared axes;
- against beta: final and peak win rate (the tables' numbers: the peak cross-fitted) with their intervals as
  error bars;
- IS diagnostics: the held-out pairs' importance weights under the current policy against step;
- win-rate figures: a dashed line at 0.5 (the reference policy's win rate against itself).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

from isdpo.report.files import atomic_path
from isdpo.report.quantities import run_values
from isdpo.report.stats import binned_curve, default_bins, instances_interval

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

#: Known losses in a fixed order (tables and legends) with fixed colours: a base loss
#: and its importance-sampled variant get contrasting colours so the pair reads at a glance.
KNOWN_LOSS_COLOURS = {
    "dpo": "tab:red",
    "isdpo": "tab:blue",
    "online_dpo": "goldenrod",
    "ipo": "tab:orange",
    "isipo": "tab:cyan",
    "slic": "tab:brown",
    "isslic": "tab:purple",
    "rpo": "tab:green",
    "chipo": "tab:olive",
    "rdpo": "tab:pink",
    "simpo": "tab:gray",
    "sft": "black",
}
# #e6ab02 last: next to online_dpo's goldenrod it reads as the same colour
_SPARE_COLOURS = ["#1b9e77", "#7570b3", "#66a61e", "#a6761d", "#e7298a", "#386cb0", "#666666", "#e6ab02"]

#: Size of every figure: inches per panel (width) and height, and the resolution.
PANEL_WIDTH_IN = 5.2
FIG_HEIGHT_IN = 4.0
DPI = 110
BAND_TEXT = "95% band (t-interval over seeds; pooled: over instance means)"


def loss_order(losses: Sequence[str]) -> list[str]:
    """Losses sorted: known ones in ``KNOWN_LOSS_COLOURS`` order, then the rest alphabetically."""
    known = list(KNOWN_LOSS_COLOURS)
    return sorted(set(losses), key=lambda name: (known.index(name) if name in known else len(known), name))


def loss_colours(losses: Sequence[str]) -> dict[str, str]:
    """A colour per loss: fixed for known losses, spare colours in sorted order for the others."""
    colours, spare = {}, iter(_SPARE_COLOURS * 4)
    for name in loss_order(losses):
        colours[name] = KNOWN_LOSS_COLOURS.get(name) or next(spare)
    return colours


def series_order(runs) -> list[str]:
    """Labels of the runs' series: by loss (``loss_order``), then by the swept settings' values."""
    first: dict[str, object] = {}
    for run in runs:
        first.setdefault(series_label(run), run)
    order = loss_order([run.loss for run in first.values()])
    return sorted(first, key=lambda label: (order.index(first[label].loss), first[label].variant_order, label))


def series_colours(runs) -> dict[str, str]:
    """A colour per series label: a bare known loss keeps its fixed colour, the others get spare colours in
    ``series_order`` (so without swept settings this is ``loss_colours`` of the losses)."""
    colours, spare = {}, iter(_SPARE_COLOURS * 4)
    for label in series_order(runs):
        colours[label] = KNOWN_LOSS_COLOURS.get(label) or next(spare)
    return colours


def series_label(run) -> str:
    """The series a run belongs to in the figures: its configuration pooled over task instances (``Run.method``),
    else its configuration (``Run.label``)."""
    return getattr(run, "method", None) or run.label


def figure_size(n_cols: int, n_rows: int = 1) -> tuple[float, float]:
    """(width, height) in inches of a figure with ``n_rows`` x ``n_cols`` panels."""
    return PANEL_WIDTH_IN * max(n_cols, 1), FIG_HEIGHT_IN * max(n_rows, 1)


def svg_path(png: Path) -> Path:
    """The SVG written beside a figure's PNG."""
    return Path(png).with_suffix(".svg")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at ``DPI`` (no tight bounding box: ``figure_size`` at ``DPI`` plus the legend's height)
    and as SVG beside it (``svg_path``; scatter points are rasterized in it), each atomically
    (``files.atomic_path``), close it and return the PNG's path."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for target, dpi, fmt in ((path, DPI, "png"), (svg_path(path), 2 * DPI, "svg")):
            with atomic_path(target) as tmp:
                fig.savefig(tmp, dpi=dpi, format=fmt)
    finally:
        plt.close(fig)
    return path


def _by_beta_and_series(runs) -> dict[float, dict[str, list]]:
    grouped: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.beta][series_label(run)].append(run)
    for per_series in grouped.values():
        for group in per_series.values():
            group.sort(key=lambda r: (getattr(r, "instance_order", ()), r.seed is None, r.seed))
    return {beta: dict(grouped[beta]) for beta in sorted(grouped)}


def _instance_rows(runs, per_instance: bool) -> list[tuple[str, list]]:
    """[(instance text, its runs)] in instance order, or [("", all runs)] pooled."""
    if not per_instance:
        return [("", list(runs))]
    rows: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: getattr(r, "instance_order", ())):
        rows.setdefault(getattr(run, "instance", ""), []).append(run)
    return list(rows.items())


def _strata(runs) -> list[list[int]]:
    """Indices of ``runs`` grouped by task instance (the strata of a pooled interval)."""
    strata: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        strata.setdefault(getattr(run, "instance", ""), []).append(i)
    return list(strata.values())


def value(row: dict, key: str) -> float:
    """``row[key]`` as a float; NaN when absent or not a number."""
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def sqrt_kl(row: dict) -> float:
    """sqrt of the k3 KL estimate; the estimate is >= 0 in expectation but clipped at 0 for safety."""
    return math.sqrt(max(value(row, "kl"), 0.0)) if math.isfinite(value(row, "kl")) else math.nan


def step_curve(runs, key: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, band low, band high) of metric ``key`` over ``runs`` at the evaluation steps where every run
    has a finite value: the mean of the instance means and its t-interval across them (one instance: the mean over
    seeds and its t-interval; one run: no band)."""
    per_run = [{row["step"]: value(row, key) for row in run.metrics if math.isfinite(value(row, key))}
               for run in runs]
    steps = sorted(set.intersection(*(set(rows) for rows in per_run))) if per_run else []
    strata = _strata(runs)
    intervals = [instances_interval([[per_run[i][s] for i in idx] for idx in strata]) for s in steps]
    return (steps, np.array([iv.mean for iv in intervals]), np.array([iv.low for iv in intervals]),
            np.array([iv.high for iv in intervals]))


def _count_text(per_series: dict[str, list]) -> str:
    """Runs behind a panel, short enough for its title: "5 seeds each", "3–5 seeds per method" or, pooled over
    instances, "15 runs (3 instances) each"."""
    counts = [len(group) for group in per_series.values()]
    n_inst = max(len({getattr(r, "instance", "") for r in group}) for group in per_series.values())
    unit = "runs" if n_inst > 1 else "seeds" if max(counts) > 1 else "seed"
    where = f" ({n_inst} instances)" if n_inst > 1 else ""
    if min(counts) == max(counts):
        return f"{counts[0]} {unit}{where} each"
    return f"{min(counts)}–{max(counts)} {unit}{where} per method"


def _grid(n_rows: int, n_cols: int, *, sharex=True, sharey=True):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=figure_size(n_cols, n_rows), squeeze=False, sharex=sharex,
                             sharey=sharey, layout="constrained")
    return fig, axes


def _finish(fig: Figure, handles: list, title: str, n_cols: int) -> Figure:
    """One legend below the panels (as many columns as fit the width) and the title."""
    renderer = fig.canvas.get_renderer()
    for ncols in range(min(len(handles), 3 * max(n_cols, 1)), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small",
                            frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    # A long legend under few panels (many methods, one beta) would take the panels' height: the figure grows by it.
    fig.set_figheight(fig.get_figheight() + legend.get_window_extent(renderer).height / fig.dpi)
    fig.suptitle(title, fontsize="large")
    return fig


def _panel_title(ax, beta: float, instance: str, per_series: dict[str, list], order: list[str]) -> None:
    where = f", {instance}" if instance else ""
    counts = _count_text(per_series) if per_series else "no run"
    ax.set_title(f"β = {beta:g}{where}  ({counts})", fontsize="medium")


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(labelleft=True, labelbottom=True)  # shared axes would hide the inner panels' tick labels
    ax.grid(alpha=0.3)


def _reference_handle(reference_y: float) -> Line2D:
    return Line2D([], [], color="0.5", linestyle="--", linewidth=0.9, label=f"reference policy ({reference_y:g})")


def _step_figure(runs, colours, *, key: str, ylabel: str, title: str, show_seeds: bool, reference_y=None,
                 per_instance: bool = False, log_y: bool = False, sharey: bool = True) -> Figure:
    """Metric ``key`` against training step: one column per beta (one row per instance with ``per_instance``),
    per series the mean and its 95% band (``step_curve``), thin per-seed lines with ``show_seeds``."""
    rows, betas, order = _instance_rows(runs, per_instance), sorted({r.beta for r in runs}), series_order(runs)
    fig, axes = _grid(len(rows), len(betas), sharey=sharey)
    drawn: list[str] = []
    for i, (instance, row_runs) in enumerate(rows):
        grouped = _by_beta_and_series(row_runs)
        for j, beta in enumerate(betas):
            ax, per_series = axes[i][j], grouped.get(beta, {})
            for label in [s for s in order if s in per_series]:
                group, colour = per_series[label], colours[label]
                if show_seeds:
                    for run in group:
                        pts = [(row["step"], value(row, key)) for row in run.metrics]
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, linewidth=0.6, alpha=0.3,
                                label="_nolegend_")
                steps, mean, low, high = step_curve(group, key)
                ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0, label="_band")
                # The last point gets a marker: where the run ended.
                ax.plot(steps, mean, color=colour, linewidth=2.0, marker="o", markersize=7, markeredgecolor="white",
                        markeredgewidth=1.0, markevery=[len(steps) - 1] if steps else None, zorder=3, label=label)
                drawn += [label] if label not in drawn else []
            if reference_y is not None:
                ax.axhline(reference_y, color="0.5", linestyle="--", linewidth=0.9, label="_reference")
            if log_y:
                ax.set_yscale("log")
            _panel_title(ax, beta, instance, per_series, order)
            _style(ax, "training step", ylabel)
    handles = [Line2D([], [], color=colours[label], linewidth=2.0, label=f"{label} (mean over seeds)")
               for label in order if label in drawn]
    handles.append(Patch(color="0.4", alpha=0.25, label=BAND_TEXT))
    if show_seeds:
        handles.append(Line2D([], [], color="0.4", linewidth=0.6, alpha=0.6, label="single seed"))
    handles.append(Line2D([], [], color="0.4", linestyle="none", marker="o", markersize=7, label="last evaluation"))
    if reference_y is not None:
        handles.append(_reference_handle(reference_y))
    return _finish(fig, handles, title, len(betas))


def plot_overoptimization(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                          per_instance: bool = False) -> Figure:
    """Golden win rate against sqrt(KL(pi || pi_ref)): every evaluation point of every run (translucent) and, per
    series, the mean win rate in equal-count bins of sqrt KL with its 95% band; one panel per beta (one row per
    instance with ``per_instance``), one x-range for all panels. ``show_seeds`` is unused: the points are the
    seeds."""
    return _against_sqrt_kl(runs, colours, "win_rate", "golden win rate vs reference",
                            f"Over-optimization: win rate against √KL{_task(task)}", 0.5, per_instance)


def plot_golden_reward_vs_sqrt_kl(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                                  per_instance: bool = False) -> Figure:
    """The mean golden reward of the policy's samples against sqrt(KL(pi || pi_ref)), drawn as
    ``plot_overoptimization`` draws the win rate."""
    return _against_sqrt_kl(runs, colours, "golden_reward", "golden reward (mean over samples)",
                            f"Over-optimization: golden reward against √KL{_task(task)}", None, per_instance)


def _against_sqrt_kl(runs, colours: dict[str, str], key: str, ylabel: str, title: str, reference_y: float | None,
                     per_instance: bool) -> Figure:
    """Metric ``key`` against sqrt KL: every evaluation point, per series the binned mean and its band."""
    rows, betas, order = _instance_rows(runs, per_instance), sorted({r.beta for r in runs}), series_order(runs)
    fig, axes = _grid(len(rows), len(betas))
    drawn: list[str] = []
    x_max = 0.0
    for i, (instance, row_runs) in enumerate(rows):
        grouped = _by_beta_and_series(row_runs)
        for j, beta in enumerate(betas):
            ax, per_series = axes[i][j], grouped.get(beta, {})
            for label in [s for s in order if s in per_series]:
                colour = colours[label]
                points = [(sqrt_kl(row), value(row, key)) for run in per_series[label] for row in run.metrics]
                x = np.array([p[0] for p in points], dtype=float)
                y = np.array([p[1] for p in points], dtype=float)
                ok = np.isfinite(x) & np.isfinite(y)
                x_max = max([x_max, *x[ok].tolist()])
                ax.scatter(x[ok], y[ok], s=6, color=colour, alpha=0.22, linewidths=0, rasterized=True,
                           label="_points")
                bx, by, low, high = binned_curve(x, y, default_bins(int(ok.sum())))
                ax.fill_between(bx, low, high, color=colour, alpha=0.2, linewidth=0, label="_band")
                ax.plot(bx, by, color=colour, linewidth=2.0, marker="o", markersize=3.5, zorder=3, label=label)
                drawn += [label] if label not in drawn else []
            if reference_y is not None:
                ax.axhline(reference_y, color="0.5", linestyle="--", linewidth=0.9, label="_reference")
            _panel_title(ax, beta, instance, per_series, order)
            _style(ax, "√KL(π‖π_ref)  (k3 estimate)", ylabel)
    for ax in (a for row in axes for a in row):  # once, after every panel: set_xlim stops autoscaling
        ax.set_xlim(0.0, 1.03 * x_max if x_max > 0 else 1.0)
    handles = [Line2D([], [], color=colours[label], linewidth=2.0, marker="o", markersize=3.5,
                      label=f"{label} (binned mean)") for label in order if label in drawn]
    handles += [Patch(color="0.4", alpha=0.25, label="95% band of the bin mean (t-interval over its points)"),
                Line2D([], [], color="0.4", linestyle="none", marker="o", markersize=3, alpha=0.4,
                       label="one evaluation (run, step)")]
    handles += [_reference_handle(reference_y)] if reference_y is not None else []
    return _finish(fig, handles, title, len(betas))


def plot_win_rate_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                          per_instance: bool = False) -> Figure:
    """Golden win rate against training step, one panel per beta, one colour per series."""
    return _step_figure(runs, colours, key="win_rate", ylabel="golden win rate vs reference",
                        title=f"Golden win rate during training{_task(task)}", show_seeds=show_seeds,
                        reference_y=0.5, per_instance=per_instance)


def plot_golden_reward_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                               per_instance: bool = False) -> Figure:
    """The mean golden reward of the policy's samples against training step, one panel per beta."""
    return _step_figure(runs, colours, key="golden_reward", ylabel="golden reward (mean over samples)",
                        title=f"Golden reward during training{_task(task)}", show_seeds=show_seeds,
                        per_instance=per_instance)


def plot_kl_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                    per_instance: bool = False) -> Figure:
    """KL(pi || pi_ref) (k3 estimate) against training step, one panel per beta, one colour per series."""
    return _step_figure(runs, colours, key="kl", ylabel="KL(π‖π_ref)  (k3 estimate, nats)",
                        title=f"KL to the reference during training{_task(task)}", show_seeds=show_seeds,
                        per_instance=per_instance)


def plot_eval_loss_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                           per_instance: bool = False) -> Figure:
    """The training loss on held-out pairs against training step, one panel per beta, one colour per series.

    Panels do not share the y axis: each loss has its own scale."""
    return _step_figure(runs, colours, key="loss", ylabel="held-out loss", title=f"Loss on held-out pairs{_task(task)}",
                        show_seeds=show_seeds, per_instance=per_instance, sharey=False)


def plot_eval_accuracy_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                               per_instance: bool = False) -> Figure:
    """Held-out preference accuracy (chosen reward > rejected reward) against training step."""
    return _step_figure(runs, colours, key="rewards/accuracies", ylabel="held-out accuracy",
                        title=f"Preference accuracy on held-out pairs{_task(task)}", show_seeds=show_seeds,
                        per_instance=per_instance)


def plot_win_rate_vs_beta(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                          per_instance: bool = False) -> Figure:
    """Final and peak golden win rate against beta, per series: the mean with its 95% interval as error bars (the
    tables' numbers: the peak cross-fitted; pooled, the mean of instance means with the t-interval across them).
    One row per instance with ``per_instance``. A point without a bar (open marker) has one seed."""
    rows, betas, order = _instance_rows(runs, per_instance), sorted({r.beta for r in runs}), series_order(runs)
    fig, axes = _grid(len(rows), 2, sharex=True, sharey=True)
    log_x = all(b > 0 for b in betas)
    drawn: list[str] = []
    for i, (instance, row_runs) in enumerate(rows):
        grouped = _by_beta_and_series(row_runs)
        labels = [s for s in order if any(s in grouped[b] for b in grouped)]
        for j, (which, name) in enumerate((("final", "final"), ("peak", "peak"))):
            ax = axes[i][j]
            for k, label in enumerate(labels):
                offset = (k - (len(labels) - 1) / 2) * 0.012
                for beta in betas:
                    group = grouped.get(beta, {}).get(label)
                    if not group:
                        continue
                    values = [run_values(run)[f"{which}_win_rate"] for run in group]
                    iv = instances_interval([[values[n] for n in idx] for idx in _strata(group)])
                    if math.isnan(iv.mean):
                        continue
                    x = beta * 10 ** offset if log_x else beta + offset
                    yerr = [[iv.mean - iv.low], [iv.high - iv.mean]] if iv.defined else None
                    ax.errorbar([x], [iv.mean], yerr=yerr, color=colours[label], marker="o", markersize=5,
                                markerfacecolor=colours[label] if iv.defined else "white", capsize=3,
                                linewidth=1.2, label="_nolegend_")
                    drawn += [label] if label not in drawn else []
            ax.axhline(0.5, color="0.5", linestyle="--", linewidth=0.9, label="_reference")
            if log_x:
                ax.set_xscale("log")
            ax.set_xticks(betas, [f"{b:g}" for b in betas])
            ax.minorticks_off()
            where = f", {instance}" if instance else (" (pooled over instances)" if len(_strata(row_runs)) > 1
                                                      else "")
            ax.set_title(f"{name} win rate{where}", fontsize="medium")
            _style(ax, "β", f"{name} golden win rate")
    handles = [Line2D([], [], color=colours[label], marker="o", linewidth=1.2, label=label)
               for label in order if label in drawn]
    handles += [Line2D([], [], color="0.4", marker="o", markerfacecolor="white", linestyle="none",
                       label="one seed (no interval)"), _reference_handle(0.5)]
    return _finish(fig, handles, f"Final and peak win rate against β (95% intervals){_task(task)}", 2)


#: The importance-weight diagnostics of the held-out pairs (metrics.jsonl key, axis label).
IS_DIAGNOSTICS = (("is/ess_frac", "ESS / n"), ("is/frac_clipped", "fraction of pairs clipped"),
                  ("is/weight_max", "largest weight (after clipping)"))


def plot_is_diagnostics(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True,
                        per_instance: bool = False) -> Figure | None:
    """``IS_DIAGNOSTICS`` against training step (rows) per beta (columns): mean and 95% band per series, for
    the series whose runs log them; None when no run does."""
    runs = [r for r in runs if any(key in row for row in r.metrics for key, _ in IS_DIAGNOSTICS)]
    if not runs:
        return None
    betas, order = sorted({r.beta for r in runs}), series_order(runs)
    fig, axes = _grid(len(IS_DIAGNOSTICS), len(betas), sharex=True, sharey="row")
    grouped = _by_beta_and_series(runs)
    drawn: list[str] = []
    for i, (key, ylabel) in enumerate(IS_DIAGNOSTICS):
        for j, beta in enumerate(betas):
            ax, per_series = axes[i][j], grouped.get(beta, {})
            for label in [s for s in order if s in per_series]:
                steps, mean, low, high = step_curve(per_series[label], key)
                if not steps:
                    continue
                ax.fill_between(steps, low, high, color=colours[label], alpha=0.18, linewidth=0, label="_band")
                ax.plot(steps, mean, color=colours[label], linewidth=1.8, label=label)
                drawn += [label] if label not in drawn else []
            _panel_title(ax, beta, "", per_series, order)
            _style(ax, "training step", f"{ylabel}  ({key})")
    handles = [Line2D([], [], color=colours[label], linewidth=1.8, label=f"{label} (mean over seeds)")
               for label in order if label in drawn]
    handles.append(Patch(color="0.4", alpha=0.25, label=BAND_TEXT))
    return _finish(fig, handles, "Held-out pairs' importance weights under the current policy" + _task(task),
                   len(betas))


def _task(task: str) -> str:
    return f" — task {task}" if task else ""


_STEP_BAND = ("Band: 95% Student-t interval of the mean over seeds at each step (pooled over instances: of the mean "
              "of instance means, t across the instance means, df K - 1).")

#: The figures of a report: file stem -> (plot function, caption). The plot function may return None (nothing to
#: draw).
FIGURES = {
    "overopt": (plot_overoptimization,
                "Over-optimization: golden win rate against √KL(π‖π_ref). Dots: every evaluation point (run, step); "
                "line: mean win rate in equal-count bins of √KL over each method's points, with the 95% t-interval "
                "band of the bin mean (points treated as independent). A curve that rises then falls while √KL "
                "keeps growing is over-optimization."),
    "overopt_golden_reward": (plot_golden_reward_vs_sqrt_kl,
                              "Over-optimization in golden reward: the mean golden reward of the policy's samples "
                              "against √KL(π‖π_ref). Dots: every evaluation point (run, step); line: mean golden "
                              "reward in equal-count bins of √KL over each method's points, with the 95% t-interval "
                              "band of the bin mean (points treated as independent)."),
    "win_rate_vs_step": (plot_win_rate_vs_step, "Golden win rate against training step. " + _STEP_BAND),
    "golden_reward_vs_step": (plot_golden_reward_vs_step,
                              "Mean golden reward of the policy's samples against training step. " + _STEP_BAND),
    "kl_vs_step": (plot_kl_vs_step, "KL(π‖π_ref) (k3 estimate) against training step. " + _STEP_BAND),
    "eval_loss_vs_step": (plot_eval_loss_vs_step,
                          "The training loss on held-out pairs against training step. " + _STEP_BAND),
    "eval_accuracy_vs_step": (plot_eval_accuracy_vs_step,
                              "Held-out preference accuracy (implicit reward of chosen > of rejected) against "
                              "training step. " + _STEP_BAND),
    "win_rate_vs_beta": (plot_win_rate_vs_beta,
                         "Final and peak golden win rate against β: mean and 95% interval (the Statistics tables' "
                         "numbers: the peak cross-fitted on the evaluation's two halves where the runs logged them; "
                         "Student-t over seeds; pooled over instances, the mean of instance means with the t-interval "
                         "across them)."),
    "is_diagnostics": (plot_is_diagnostics,
                       "Held-out pairs' importance weights under the current policy, for every method (they are "
                       "computed on the held-out pairs whatever the loss): effective sample size / n, fraction of "
                       "pairs clipped, largest weight after clipping. " + _STEP_BAND),
}

#: The metrics.jsonl keys each figure draws: a run enters a figure when some of its rows have them.
FIGURE_KEYS = {"overopt": ("win_rate", "kl"), "overopt_golden_reward": ("golden_reward", "kl"),
               "win_rate_vs_step": ("win_rate",), "golden_reward_vs_step": ("golden_reward",), "kl_vs_step": ("kl",),
               "eval_loss_vs_step": ("loss",), "eval_accuracy_vs_step": ("rewards/accuracies",),
               "win_rate_vs_beta": ("win_rate",), "is_diagnostics": ()}

#: The figures that also get a per-instance variant (one row of panels per task instance) when the sweep has
#: more than one instance.
PER_INSTANCE_FIGURES = ("overopt", "overopt_golden_reward", "win_rate_vs_step", "golden_reward_vs_step", "kl_vs_step",
                        "win_rate_vs_beta")
