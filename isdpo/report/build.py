"""The report itself: report.md, the CSV files and the figures of a sweep folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from isdpo.report.claims import claim_rows, claims_markdown, claims_note
from isdpo.report.files import write_text
from isdpo.report.plots import FIGURE_KEYS, FIGURES, PER_INSTANCE_FIGURES, save_figure, series_colours, svg_path
from isdpo.report.quantities import cross_fitted
from isdpo.report.runs import HYDRA_CONFIG, HYDRA_PENDING, INSTANCE_KEY, METRICS, RESULT, Run, load_sweep
from isdpo.report.stats import interval_note
from isdpo.report.tables import markdown_table, md_escape, run_rows, setting_columns, statistics_markdown, \
    statistics_rows, summarise, write_csv
from isdpo.report.wandb import fetch_wandb, log_to_wandb, report_target, wandb_markdown

def make_figures(runs: list[Run], out: Path, show_seeds: bool = False) -> dict[str, list[tuple[Path, str]]]:
    """Draw and save (PNG and SVG) every figure of ``plots.FIGURES`` per task, and the per-instance variant
    (``<stem>_<task>_per_instance``, one row of panels per instance) of ``PER_INSTANCE_FIGURES`` when the task
    has several instances; returns task -> [(png, caption)].

    A run enters a figure when some of its evaluation points have the figure's metrics (a task without a golden
    reward has no win-rate figure).
    """
    done = [r for r in runs if r.ok]
    colours = series_colours(done)  # one mapping for all tasks and figures
    pngs: dict[str, list[tuple[Path, str]]] = {}
    for task in sorted({r.task or "" for r in done}):
        task_runs = [r for r in done if (r.task or "") == task]
        several = len({r.instance for r in task_runs}) > 1
        for stem, (plot, caption) in FIGURES.items():
            keys = set(FIGURE_KEYS[stem])
            having = [r for r in task_runs if any(keys <= set(row) for row in r.metrics)]
            for per_instance in (False, True) if several and stem in PER_INSTANCE_FIGURES else (False,):
                fig = plot(having, colours, task=task, show_seeds=show_seeds, per_instance=per_instance) \
                    if having else None
                if fig is None:
                    continue
                name = f"{stem}_{_slug(task or 'task')}" + ("_per_instance" if per_instance else "")
                text = caption + (" One row of panels per task instance." if per_instance else
                                  " Pooled over task instances." if several else "")
                pngs.setdefault(task, []).append((save_figure(fig, out / f"{name}.png"), text))
    return pngs


class NoRuns(Exception):
    """The sweep folder holds no run folder."""


class NotLogged(Exception):
    """The report is written (``report``: its report.md) but logging it to W&B failed."""

    def __init__(self, report: Path, error: Exception):
        super().__init__(f"{error.__class__.__name__}: {error}")
        self.report = report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def statistics_section(stats: list[dict], claims: list[dict], instance_key: str = INSTANCE_KEY) -> list[str]:
    """The Statistics and Claims sections of report.md (lines)."""
    if not stats:
        return []
    md = ["## Statistics", "",
          f"Mean [95% interval] per configuration and task instance (`{instance_key}`): {interval_note()}. Then "
          "pooled over instances, treating them as a random sample of the task's instances: the mean of the "
          "instance means and the Student-t interval across the K instance means (df K − 1), so with few "
          "instances it is wide. Final = last evaluation point; peak = cross-fitted (module `quantities`, "
          "docs/method.md §7); max KL over the whole curve (metrics.jsonl). Failed runs are not in these numbers "
          "(listed below).", ""]
    for task in sorted({r["task"] for r in stats}):
        rows = [r for r in stats if r["task"] == task]
        several = any(r["level"] == "pooled" and r["n_instances"] > 1 for r in rows)
        md += [f"### Task `{task or '?'}`", "", "Per instance:" if several else "Per configuration:", "",
               statistics_markdown(rows, "instance", instance_key), ""]
        if several:
            md += ["Pooled over instances:", "", statistics_markdown(rows, "pooled", instance_key), ""]
    md += ["## Claims", "",
           "Paired differences a − b: runs paired by instance, seed, β and every other setting. Per instance: the "
           "mean difference over seeds, its 95% t-interval and the two-sided p-value of the same t statistic. "
           "Pooled: on how many instances a is higher, then the mean of the instance mean differences with the "
           "t-interval across instances (df K − 1). Runs without a partner are left out and counted. "
           + (claims_note(claims) + " A claim that does not survive may still be true: the sweep did not show it "
              "with the family-wise error held at 5%." if claims else ""), ""]
    if not claims:
        md += ["No comparison: the sweep has no importance-sampled or online loss together with its base.", ""]
    for task in sorted({r["task"] for r in claims}):
        md += [f"### Task `{task or '?'}`", ""] + claims_markdown([r for r in claims if r["task"] == task])
    return md


def build_report(sweep: Path, out: Path | None = None, wandb_project: str | None = None,
                 show_seeds: bool = False, figures: bool = True, log: Callable[[str], None] = print,
                 instance_key: str = INSTANCE_KEY, log_wandb: bool = False, wandb_group: str | None = None) -> Path:
    """Write report.md, summary.csv, runs.csv, stats.csv, claims.csv and (unless ``figures=False``) the figures
    (PNG and SVG) for ``sweep`` into ``out``. ``instance_key``: the config key naming the task instance.
    ``wandb_project``: also list that W&B project's runs. ``log_wandb``: then log the report (figures and CSV
    tables) as a W&B run of job_type ``report`` into ``wandb_group`` of ``wandb_project`` (default: the group and
    project the runs logged into; ``report.wandb.NoTarget`` before anything is written when they name none).

    Returns the path of report.md; raises :class:`NotLogged` when it is written but logging it failed.
    """
    sweep = Path(sweep)
    out = Path(out) if out else sweep / "report"
    runs = load_sweep(sweep, exclude=out, instance_key=instance_key)
    if not runs:  # before creating ``out``: no empty report folder is left behind
        raise NoRuns(f"no runs under {sweep} (no {RESULT}, {METRICS}, {HYDRA_CONFIG} or {HYDRA_PENDING}/)")
    target = report_target(runs, wandb_project, wandb_group) if log_wandb else None  # refused before any write
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "incomplete", "failed", "duplicate")}
    log(f"[report] {len(runs)} runs under {sweep}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))

    summary = summarise(runs)
    stats, claims = statistics_rows(runs, instance_key), claim_rows(runs, instance_key)
    for name, rows in (("summary.csv", summary), ("runs.csv", run_rows(runs)), ("stats.csv", stats),
                       ("claims.csv", claims)):
        write_csv(out / name, rows)
    pngs = make_figures(runs, out, show_seeds=show_seeds) if figures else {}

    experiments = sorted({str(r.result.get("experiment")) for r in runs if r.ok and r.result.get("experiment")})
    md = [f"# Sweep report: {sweep.resolve().name}", "",
          f"Sweep directory: `{sweep.resolve()}`  ",
          f"Generated: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
          (f"Experiment: {', '.join(experiments)}  " if experiments else ""),
          f"Runs: {len(runs)} found — " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    if counts["completed"] == 0:
        md += ["**No completed run: no table and no figure.**", ""]
    settings_note = (" Columns in `code` are the settings, besides loss, β and seed, that differ between runs "
                     "(from the run's own `run_config.json`, else `.hydra/config.yaml`; interpolations as written): "
                     "one row per configuration; – = not in that run's config, ? = run without a config, (IS off) = "
                     "an importance-sampling setting of a run without importance sampling." if setting_columns(summary)
                     else "")
    done = [r for r in runs if r.ok and any("win_rate" in row for row in r.metrics)]
    biased = [r for r in done if not cross_fitted(r)]
    peak_note = (f" **{len(biased)} of {len(done)} runs have no per-half win rates** (`win_rate_a`/`_b`: older "
                 "code): their peak and peak − final are the same-sample ones, biased upwards." if biased else "")
    for task in sorted({row["task"] for row in summary}):
        md += [f"## Task `{task or '?'}`", "",
               "Mean ± sample standard deviation over seeds, from each run's `result.json` and curve "
               "(final = last evaluation point; peak win rate and golden reward cross-fitted: the step of the "
               "maximum picked on one half of the evaluation prompts, its value read on the other half, both ways "
               "averaged, so evaluation noise does not inflate the peak; step of peak = that of the highest full "
               "win rate, or without one of the highest held-out accuracy; held-out = the pair metrics on held-out "
               "pairs). Peak − final win rate is the over-optimization indicator: large means the policy got "
               "worse after its best point. Bold: best final win rate at that β." + settings_note + peak_note, "",
               f"95% CI: {interval_note()}.", "",
               markdown_table([row for row in summary if row["task"] == task]), ""]
        for path, caption in pngs.get(task, []):
            md += [f"![{path.stem}]({path.name})", "", f"*{caption}* (SVG: [{svg_path(path).name}]"
                   f"({svg_path(path).name}))", ""]
    md += statistics_section(stats, claims, instance_key)

    problems = [r for r in runs if not r.ok]
    md += ["## Incomplete and failed runs", ""]
    if problems:
        md += ["Not in the tables or figures above.", "", "| folder | loss | β | seed | status | reason |",
               "|---|---|---:|---:|---|---|"]
        for r in problems:
            md.append(f"| `{md_escape(r.name)}` | {r.loss or '?'} | {r.beta if r.beta is not None else '?'} | "
                      f"{r.seed if r.seed is not None else '?'} | {r.status} | {md_escape(r.reason)} |")
        md.append("")
    else:
        md += ["None: every run completed.", ""]
    noted = [r for r in runs if r.notes]
    if noted:
        md += ["Notes:", ""] + [f"- `{r.name}`: {'; '.join(r.notes)}" for r in noted] + [""]

    if wandb_project:
        log(f"[report] fetching W&B runs of {wandb_project} ...")
        rows, error = fetch_wandb(wandb_project)
        if error:
            log(f"[report] W&B: could not fetch runs ({error}); the local report is complete without them")
        else:
            log(f"[report] W&B: {len(rows)} runs")
        md.append(wandb_markdown(wandb_project, rows, error))

    md += ["## Files", "", "- `summary.csv`: the tables above, one row per configuration: task × loss × β × "
           "any other swept setting (mean, std, n over seeds, 95% interval bounds `*_ci_low`, `*_ci_high`)",
           "- `runs.csv`: one row per run folder, failed ones included",
           "- `stats.csv`: the Statistics tables, one row per configuration × instance (level `instance`) or "
           "configuration pooled over instances (level `pooled`) × metric",
           "- `claims.csv`: the Claims, one row per comparison × context × instance or pooled × metric "
           "(mean paired difference, t-interval, p, Holm-adjusted p, whether it survives Holm, verdict; pooled "
           "rows: the sign test over instances `p_sign` and its own Holm family `p_sign_holm`, `sign_survives_holm`; "
           "the sentence)"]
    md += [f"- `{path.name}`, `{svg_path(path).name}`: {caption.split('.')[0]}"
           for task in sorted(pngs) for path, caption in pngs[task]] + [""]
    report = write_text(out / "report.md", "\n".join(md))
    if problems:
        log(f"[report] {len(problems)} run(s) not completed, listed in report.md")
    if target is not None:
        log(f"[report] logging the report to W&B (group {target.group!r}) ...")
        try:
            log_to_wandb(out, [path for task in sorted(pngs) for path, _ in pngs[task]], target,
                         config={"sweep": str(sweep.resolve()), "instance_key": instance_key,
                                 **{f"runs/{s}": n for s, n in counts.items()}}, log=log)
        except Exception as err:  # noqa: BLE001 - no wandb, no network, a refused key: the local report stands
            raise NotLogged(report, err) from err
    return report


