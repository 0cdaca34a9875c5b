"""Figures of a sweep report: over-optimization curves and training curves, one panel per beta.

Every function takes the completed runs of one task (``isdpo.report.Run``), a
series -> colour mapping (``series_colours``, shared by all figures so a series has
the same colour everywhere) and returns the matplotlib ``Figure`` it drew, so callers
(and the tests) can inspect axes and lines before or after saving it.

A series is one configuration within a panel, named by ``Run.label``: the loss, plus
the other swept settings when the sweep varies more than loss, beta and seed (e.g.
"isdpo, log_clip=0.5"). What each panel holds, exactly:

- per series, one thick line: the mean over seeds at each evaluation step common to
  all seeds of that configuration; its final point carries a marker;
- per series and seed, one thin line (only with ``show_seeds=True``);
- win-rate figures only: one dashed horizontal line at 0.5 (the reference policy's
  win rate against itself).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

#: Known losses in a fixed order (tables and legends) with fixed colours: a base loss
#: and its importance-sampled variant get contrasting colours so the pair reads at a glance.
KNOWN_LOSS_COLOURS = {
    "dpo": "tab:red",
    "isdpo": "tab:blue",
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
_SPARE_COLOURS = ["#e6ab02", "#1b9e77", "#7570b3", "#66a61e", "#a6761d", "#e7298a", "#386cb0", "#666666"]

#: Size of every figure: inches per panel (width) and height, and the resolution.
PANEL_WIDTH_IN = 5.2
FIG_HEIGHT_IN = 4.0
DPI = 110


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
        first.setdefault(run.label, run)
    order = loss_order([run.loss for run in first.values()])
    return sorted(first, key=lambda label: (order.index(first[label].loss), first[label].variant_order, label))


def series_colours(runs) -> dict[str, str]:
    """A colour per series label: a bare known loss keeps its fixed colour, the others get spare colours in
    ``series_order`` (so without swept settings this is ``loss_colours`` of the losses)."""
    colours, spare = {}, iter(_SPARE_COLOURS * 4)
    for label in series_order(runs):
        colours[label] = KNOWN_LOSS_COLOURS.get(label) or next(spare)
    return colours


def figure_size(n_panels: int) -> tuple[float, float]:
    """(width, height) in inches of a figure with ``n_panels`` panels side by side."""
    return PANEL_WIDTH_IN * max(n_panels, 1), FIG_HEIGHT_IN


def figure_pixels(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``save_figure`` writes for ``n_panels`` panels."""
    w, h = figure_size(n_panels)
    return round(w * DPI), round(h * DPI)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at ``DPI`` (no tight bounding box, so the size is ``figure_pixels``) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _by_beta_and_series(runs) -> dict[float, dict[str, list]]:
    grouped: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.beta][run.label].append(run)
    for per_series in grouped.values():
        for group in per_series.values():
            group.sort(key=lambda r: (r.seed is None, r.seed))
    return {beta: dict(grouped[beta]) for beta in sorted(grouped)}


def mean_curve(runs, x_of: Callable[[dict], float], y_of: Callable[[dict], float]) -> tuple[list, list, list]:
    """(steps, mean x, mean y) over ``runs`` at the evaluation steps every run has.

    Averaging at matching steps (rather than interpolating) keeps every point a real
    evaluation; seeds of one configuration share the evaluation schedule.
    """
    per_run = [{row["step"]: row for row in run.metrics} for run in runs]
    steps = sorted(set.intersection(*(set(rows) for rows in per_run))) if per_run else []
    xs = [sum(x_of(rows[s]) for rows in per_run) / len(per_run) for s in steps]
    ys = [sum(y_of(rows[s]) for rows in per_run) / len(per_run) for s in steps]
    return steps, xs, ys


def sqrt_kl(row: dict) -> float:
    """sqrt of the k3 KL estimate; the estimate is >= 0 in expectation but clipped at 0 for safety."""
    return math.sqrt(max(float(row["kl"]), 0.0))


def _panels(runs, colours, *, x_of, y_of, xlabel, ylabel, title, show_seeds, reference_y=None,
            sharey=False) -> Figure:
    grouped = _by_beta_and_series(runs)
    order = series_order(runs)
    fig, axes = plt.subplots(1, max(len(grouped), 1), figsize=figure_size(len(grouped)), squeeze=False,
                             sharey=sharey, layout="constrained")
    axes = axes[0]
    drawn: list[str] = []
    for ax, (beta, per_series) in zip(axes, grouped.items()):
        for label in [s for s in order if s in per_series]:
            group, colour = per_series[label], colours[label]
            if show_seeds:
                for run in group:
                    ax.plot([x_of(r) for r in run.metrics], [y_of(r) for r in run.metrics], color=colour,
                            linewidth=0.7, alpha=0.35, label="_nolegend_")
            steps, xs, ys = mean_curve(group, x_of, y_of)
            # The last point gets a marker: on the KL axis the curve can double back, so its end is not
            # otherwise obvious.
            ax.plot(xs, ys, color=colour, linewidth=2.0, marker="o", markersize=8, markeredgecolor="white",
                    markeredgewidth=1.2, markevery=[len(xs) - 1] if xs else None, zorder=3, label=label)
            drawn += [label] if label not in drawn else []
        if reference_y is not None:
            ax.axhline(reference_y, color="0.5", linestyle="--", linewidth=0.9, label="_reference")
        counts = {label: len(group) for label, group in per_series.items()}
        if len(set(counts.values())) == 1:
            seeds = f"{next(iter(counts.values()))} seed{'s' if max(counts.values()) != 1 else ''} each"
        elif any(label != run.loss for label, (run, *_) in per_series.items()):
            # Labels with swept settings are too long to list in a panel title.
            seeds = f"{min(counts.values())}–{max(counts.values())} seeds per configuration"
        else:
            seeds = "seeds: " + ", ".join(f"{label} {counts[label]}" for label in order if label in counts)
        ax.set_title(f"β = {beta:g}  ({seeds})", fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.tick_params(labelleft=True)  # sharey would hide the tick labels of the right-hand panels
        ax.grid(alpha=0.3)
    # One legend for the figure, below the panels: the colours are the same in every panel (and figure), and
    # proxy artists (not added to any axes) explain the line styles.
    handles = [Line2D([], [], color=colours[label], linewidth=2.0, label=f"{label} (mean over seeds)")
               for label in order if label in drawn]
    if show_seeds:
        handles.append(Line2D([], [], color="0.4", linewidth=0.7, alpha=0.6, label="single seed"))
    handles.append(Line2D([], [], color="0.4", linestyle="none", marker="o", markersize=7,
                          label="last evaluation"))
    if reference_y is not None:
        handles.append(Line2D([], [], color="0.5", linestyle="--", linewidth=0.9,
                              label=f"reference policy ({reference_y:g})"))
    # As many columns as fit the figure's width: long series labels (swept settings) need fewer.
    renderer = fig.canvas.get_renderer()
    for ncols in range(min(len(handles), 3 * max(len(grouped), 1)), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small",
                            frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    fig.suptitle(title, fontsize="large")
    return fig


def plot_overoptimization(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True) -> Figure:
    """Golden win rate against sqrt(KL(pi || pi_ref)), one panel per beta, one colour per series."""
    return _panels(runs, colours, x_of=sqrt_kl, y_of=lambda r: float(r["win_rate"]),
                   xlabel="√KL(π‖π_ref)  (k3 estimate)", ylabel="golden win rate vs reference",
                   title=f"Over-optimization: win rate against √KL{_task(task)}", show_seeds=show_seeds,
                   reference_y=0.5, sharey=True)


def plot_win_rate_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True) -> Figure:
    """Golden win rate against training step, one panel per beta, one colour per series."""
    return _panels(runs, colours, x_of=lambda r: r["step"], y_of=lambda r: float(r["win_rate"]),
                   xlabel="training step", ylabel="golden win rate vs reference",
                   title=f"Golden win rate during training{_task(task)}", show_seeds=show_seeds,
                   reference_y=0.5, sharey=True)


def plot_kl_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True) -> Figure:
    """KL(pi || pi_ref) (k3 estimate) against training step, one panel per beta, one colour per series."""
    return _panels(runs, colours, x_of=lambda r: r["step"], y_of=lambda r: float(r["kl"]),
                   xlabel="training step", ylabel="KL(π‖π_ref)  (k3 estimate, nats)",
                   title=f"KL to the reference during training{_task(task)}", show_seeds=show_seeds)


def plot_eval_loss_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True) -> Figure:
    """The training loss on held-out pairs against training step, one panel per beta, one colour per series."""
    return _panels(runs, colours, x_of=lambda r: r["step"], y_of=lambda r: float(r["loss"]),
                   xlabel="training step", ylabel="held-out loss", title=f"Loss on held-out pairs{_task(task)}",
                   show_seeds=show_seeds)


def plot_eval_accuracy_vs_step(runs, colours: dict[str, str], task: str = "", show_seeds: bool = True) -> Figure:
    """Held-out preference accuracy (chosen reward > rejected reward) against training step."""
    return _panels(runs, colours, x_of=lambda r: r["step"], y_of=lambda r: float(r["rewards/accuracies"]),
                   xlabel="training step", ylabel="held-out accuracy",
                   title=f"Preference accuracy on held-out pairs{_task(task)}", show_seeds=show_seeds, sharey=True)


def _task(task: str) -> str:
    return f" — task {task}" if task else ""


#: The figures of a report: file stem -> (plot function, caption).
FIGURES = {
    "overopt": (plot_overoptimization,
                "Over-optimization curve: golden win rate against √KL(π‖π_ref). A curve that rises then falls "
                "while √KL keeps growing is over-optimization."),
    "win_rate_vs_step": (plot_win_rate_vs_step, "Golden win rate against training step."),
    "kl_vs_step": (plot_kl_vs_step, "KL(π‖π_ref) (k3 estimate) against training step."),
    "eval_loss_vs_step": (plot_eval_loss_vs_step, "The training loss on held-out pairs against training step."),
    "eval_accuracy_vs_step": (plot_eval_accuracy_vs_step,
                              "Held-out preference accuracy (implicit reward of chosen > of rejected) against "
                              "training step."),
}

#: The metrics.jsonl keys each figure draws: a task's runs get the figure only when every row has them.
FIGURE_KEYS = {"overopt": ("win_rate", "kl"), "win_rate_vs_step": ("win_rate",), "kl_vs_step": ("kl",),
               "eval_loss_vs_step": ("loss",), "eval_accuracy_vs_step": ("rewards/accuracies",)}
