"""The report's tables: the summary per configuration (mean ± std over seeds, 95% t-interval), the statistics per
configuration and task instance and pooled over instances, and the CSV files."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from isdpo.report.files import atomic_path
from isdpo.report.plots import loss_order
from isdpo.report.quantities import STAT_QUANTITIES, TABLE_QUANTITIES, run_values
from isdpo.report.runs import INSTANCE_KEY, Run, by_instance, format_value
from isdpo.report.stats import Interval, format_interval, instances_interval, t_interval


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n); std is NaN for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def summarise(runs: list[Run]) -> list[dict]:
    """One row per configuration (task, loss, beta and the other varying settings) of the completed runs: the
    shown settings (``Run.variant``, as text), seeds, mean/std/n of each ``TABLE_QUANTITIES`` and the 95%
    t-interval over seeds (``{col}_ci_low``, ``{col}_ci_high``) of each ``STAT_QUANTITIES`` mean."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault((run.task or "", run.loss, run.beta, run.group), []).append(run)
    order = loss_order([k[1] for k in groups])
    rows = []
    for k in sorted(groups, key=lambda k: (k[0], k[2], order.index(k[1]), groups[k][0].variant_order)):
        task, loss, beta, _ = k
        group = sorted(groups[k], key=lambda r: (r.seed is None, r.seed))
        row: dict[str, Any] = {"task": task, "loss": loss, "beta": beta}
        row.update({key: format_value(value) for key, value in group[0].variant.items()})
        row.update({"n_seeds": len(group), "seeds": " ".join(str(r.seed) for r in group)})
        per_run = [run_values(r) for r in group]
        for col in TABLE_QUANTITIES:
            values = [v[col] for v in per_run if v[col] is not None]
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = mean_std(values)
        for col in STAT_QUANTITIES:
            interval = t_interval([v[col] for v in per_run if v[col] is not None])
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = interval.low, interval.high
        rows.append(row)
    return rows


def _cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if not math.isnan(std) else "")


def _ci_cell(low: float, high: float, fmt: str) -> str:
    return "n/a" if math.isnan(low) or math.isnan(high) else f"[{low:{fmt}}, {high:{fmt}}]"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def setting_columns(rows: list[dict]) -> list[str]:
    """The swept-setting columns of ``summarise`` rows (config keys such as ``loss.importance_sampling.log_clip``)."""
    fixed = {"task", "loss", "beta", "n_seeds", "seeds"} | {f"{c}_{s}" for c in TABLE_QUANTITIES
                                                            for s in ("mean", "std", "n")} \
        | {f"{c}_ci_{s}" for c in STAT_QUANTITIES for s in ("low", "high")}
    return [k for k in (rows[0] if rows else {}) if k not in fixed]


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of ``summarise`` rows of one task: the swept settings that vary among these rows, then
    mean ± std per quantity, followed by its 95% interval ("95% CI") for the ``STAT_QUANTITIES``.

    The best final win rate at each beta is in bold.
    A column appears only when some run has its value (the judge's, the win rate's on a task without a
    golden reward); the judge's cell names its own n when fewer seeds were judged than trained.
    """
    settings = [k for k in setting_columns(rows) if len({r[k] for r in rows}) > 1]
    cols = [c for c in TABLE_QUANTITIES if any(r[f"{c}_n"] for r in rows)]
    heads = []
    for c in cols:
        heads += [TABLE_QUANTITIES[c][0]] + (["95% CI"] if c in STAT_QUANTITIES else [])
    header = ["loss", "β"] + [f"`{k}`" for k in settings] + heads + ["n seeds"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * (2 + len(settings)) + ["---:"] * (len(heads) + 1)) + "|"]
    best = {}
    for r in rows:
        if not math.isnan(r["final_win_rate_mean"]):
            best[r["beta"]] = max(best.get(r["beta"], -math.inf), r["final_win_rate_mean"])
    for r in rows:
        cells = [f"`{r['loss']}`", f"{r['beta']:g}"] + [md_escape(r[k]) for k in settings]
        for c in cols:
            fmt = TABLE_QUANTITIES[c][1]
            text = _cell(r[f"{c}_mean"], r[f"{c}_std"], fmt)
            if c == "final_win_rate" and len(best) and r["final_win_rate_mean"] == best.get(r["beta"]) \
                    and sum(1 for o in rows if o["beta"] == r["beta"]) > 1:
                text = f"**{text}**"
            if c == "judge_win_rate" and 0 < r[f"{c}_n"] < r["n_seeds"]:
                text += f" (n={r[f'{c}_n']})"
            cells.append(text)
            if c in STAT_QUANTITIES:
                cells.append(_ci_cell(r[f"{c}_ci_low"], r[f"{c}_ci_high"], fmt))
        cells.append(f"{r['n_seeds']} ({r['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _config_key(run: Run) -> tuple:
    """A configuration pooled over task instances: task, loss, beta and every varying setting but the instance."""
    return run.task or "", run.loss, run.beta, run.config_group


def _shown(run: Run, instance_key: str) -> dict[str, str]:
    """The run's shown settings except the instance key, as text."""
    return {k: format_value(v) for k, v in run.variant.items() if k != instance_key}


def interval_fields(interval: Interval) -> dict[str, Any]:
    """An interval's CSV columns: mean, bounds, degrees of freedom and what the t-interval is over (the seeds of
    one instance, or the instance means)."""
    return {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high, "df": interval.df,
            "interval_over": "instances" if interval.n_strata > 1 else "seeds"}


def statistics_rows(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[dict]:
    """Long rows (one per configuration x instance x ``STAT_QUANTITIES`` metric it has, level "instance", plus one per
    configuration x metric pooled over instances, level "pooled") of the completed runs: n, mean and 95%
    t-interval over seeds; pooled: the mean of the instance means and the t-interval across them (instances a
    random sample, df K - 1; one instance: its own row)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(_config_key(run), []).append(run)
    order = loss_order([k[1] for k in groups])
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[2], order.index(k[1]), groups[k][0].method or "")):
        task, loss, beta, _ = key
        instances = by_instance(groups[key])
        values = {id(r): run_values(r) for r in groups[key]}
        base = {"task": task, "loss": loss, "beta": beta, "method": groups[key][0].method}
        base.update(_shown(groups[key][0], instance_key))
        for col in STAT_QUANTITIES:
            if all(values[id(r)][col] is None for r in groups[key]):
                continue  # a metric this configuration does not have (no golden reward on task=preference)
            strata = []
            for instance, members in instances.items():
                kept = [r for r in members if values[id(r)][col] is not None]
                strata.append([values[id(r)][col] for r in kept])
                interval = t_interval(strata[-1])
                rows.append({**base, "level": "instance", "instance": instance, "metric": col, "n_instances": 1,
                             "n": interval.n, "seeds": " ".join(str(r.seed) for r in kept),
                             **interval_fields(interval)})
            interval = instances_interval(strata)
            rows.append({**base, "level": "pooled", "instance": f"pooled over {len(instances)}", "metric": col,
                         "n_instances": interval.n_strata, "n": interval.n, "seeds": "",
                         **interval_fields(interval)})
    return rows


def _stat_header(col: str) -> str:
    return TABLE_QUANTITIES[col][0]


def statistics_markdown(rows: list[dict], level: str, instance_key: str = INSTANCE_KEY) -> str:
    """A Markdown table of ``statistics_rows`` of one task and one level: a row per configuration (x instance),
    a column per metric: mean [95% interval]."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["level"] == level:
            key = (r["loss"], r["beta"], r["method"], r["instance"])
            cells.setdefault(key, {"row": r, "n": {}})[r["metric"]] = r
            cells[key]["n"][r["metric"]] = r["n"]
    if not cells:
        return ""
    settings = [k for k in rows[0] if "." in k and k != instance_key]
    settings = [k for k in settings if len({r.get(k) for r in rows}) > 1]
    metrics = [c for c in STAT_QUANTITIES if any(v.get(c) and v[c]["n"] for v in cells.values())]
    head = ["loss", "β"] + [f"`{k}`" for k in settings]
    head += ["instance", "n seeds"] if level == "instance" else ["n instances", "n runs"]
    head += [_stat_header(c) for c in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (len(settings) + 3) + ["---:"] *
                                                            (len(metrics) + 1)) + "|"]
    for (loss, beta, _, instance), entry in cells.items():
        first = entry["row"]
        count = [instance or "–", str(max(entry["n"].values()))] if level == "instance" else \
            [str(first["n_instances"]), str(max(entry["n"].values()))]
        texts = []
        for c in metrics:
            r = entry.get(c)
            iv = Interval(r["mean"], r["ci_low"], r["ci_high"], r["n"]) if r else Interval(math.nan, math.nan,
                                                                                            math.nan, 0)
            texts.append(format_interval(iv, TABLE_QUANTITIES[c][1]))
        lines.append("| " + " | ".join([f"`{loss}`", f"{beta:g}"] + [md_escape(str(first.get(k, "")))
                                                                     for k in settings] + count + texts) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write dict rows as CSV (columns: union of keys, in first-seen order), atomically; no rows: an empty file."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def run_rows(runs: list[Run]) -> list[dict]:
    """One CSV row per run (failed ones included): identity, shown settings, status, reason, per-run quantities."""
    rows = []
    for run in runs:
        row = {"folder": run.name, "task": run.task, "loss": run.loss, "beta": run.beta, "seed": run.seed}
        row.update({key: format_value(value) for key, value in run.variant.items()})
        row.update({"status": run.status, "reason": run.reason, "n_eval_points": len(run.metrics)})
        row.update(run_values(run) if run.ok else dict.fromkeys(TABLE_QUANTITIES))
        rows.append(row)
    return rows


