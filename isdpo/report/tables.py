"""The report's tables: per-run quantities (result.json, metrics.jsonl), the summary per configuration (mean ±
std over seeds, 95% interval), the statistics per configuration and task instance and pooled, and the CSV files."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Callable

from isdpo.report.plots import loss_order
from isdpo.report.runs import INSTANCE_KEY, Run, by_instance, format_value, to_float
from isdpo.report.stats import Interval, bootstrap_interval, format_interval, stratified_interval

def _judge(result: dict) -> float | None:
    judge = result.get("judge")
    return to_float(judge.get("win_rate")) if isinstance(judge, dict) else None


def _point(result: dict, which: str, key: str) -> float | None:
    """``result[which][key]`` (which: final | peak) as a float; None when the run has no such metric."""
    row = result.get(which)
    return to_float(row.get(key)) if isinstance(row, dict) else None


def _drop(result: dict) -> float | None:
    peak, final = _point(result, "peak", "win_rate"), _point(result, "final", "win_rate")
    return None if peak is None or final is None else peak - final


#: Per-run quantities of the summary: column -> (header, number format, value from result.json or None).
#: A table shows a column only when some run has its value (no win rate without a golden reward).
RUN_QUANTITIES: dict[str, tuple[str, str, Callable[[dict], float | None]]] = {
    "final_win_rate": ("final win rate", ".3f", lambda r: _point(r, "final", "win_rate")),
    "peak_win_rate": ("peak win rate", ".3f", lambda r: _point(r, "peak", "win_rate")),
    "peak_step": ("step of peak", ".0f", lambda r: _point(r, "peak", "step")),
    "final_kl": ("final KL", ".3g", lambda r: _point(r, "final", "kl")),
    "drop": ("peak − final win rate", ".3f", _drop),
    "final_eval_accuracy": ("final held-out accuracy", ".3f", lambda r: _point(r, "final", "rewards/accuracies")),
    "final_eval_loss": ("final held-out loss", ".3g", lambda r: _point(r, "final", "loss")),
    "judge_win_rate": ("judge win rate", ".3f", _judge),
}


def _max_kl(run: Run) -> float | None:
    """Largest finite KL over the run's evaluation points (metrics.jsonl); None without one."""
    kls = [v for v in (to_float(row.get("kl")) for row in run.metrics) if v is not None and math.isfinite(v)]
    return max(kls) if kls else None


#: Per-run quantities from the whole curve (metrics.jsonl): column -> (header, number format, value of a Run).
CURVE_QUANTITIES: dict[str, tuple[str, str, Callable[[Run], float | None]]] = {
    "max_kl": ("max KL over the curve", ".3g", _max_kl),
}
#: Columns of the summary in order: RUN_QUANTITIES with CURVE_QUANTITIES after the final KL.
TABLE_QUANTITIES: dict[str, tuple[str, str]] = {}
for _col, (_header, _fmt, _) in RUN_QUANTITIES.items():
    TABLE_QUANTITIES[_col] = (_header, _fmt)
    if _col == "final_kl":
        TABLE_QUANTITIES.update({c: (h, f) for c, (h, f, _) in CURVE_QUANTITIES.items()})
#: The quantities with 95% bootstrap intervals (summary, statistics, claims).
STAT_QUANTITIES = ("final_win_rate", "peak_win_rate", "drop", "final_kl", "max_kl")


def run_values(run: Run) -> dict[str, float | None]:
    """Every ``TABLE_QUANTITIES`` value of one completed run; None where the run has none or it is not finite
    (NaN): such a value is left out of means and intervals, not averaged."""
    values: dict[str, float | None] = {}
    for col, (_, _, get) in RUN_QUANTITIES.items():
        try:
            values[col] = get(run.result or {})
        except (KeyError, TypeError, ValueError, AttributeError):
            values[col] = None
    values.update({col: get(run) for col, (_, _, get) in CURVE_QUANTITIES.items()})
    return {col: v if v is not None and math.isfinite(v) else None for col, v in values.items()}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n); std is NaN for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def summarise(runs: list[Run]) -> list[dict]:
    """One row per configuration (task, loss, beta and the other varying settings) of the completed runs: the
    shown settings (``Run.variant``, as text), seeds, mean/std/n of each ``TABLE_QUANTITIES`` and the 95%
    bootstrap interval (``{col}_ci_low``, ``{col}_ci_high``) of each ``STAT_QUANTITIES`` mean."""
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
            interval = bootstrap_interval([v[col] for v in per_run if v[col] is not None])
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
    return {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
            "resamples": interval.resamples, "exact": interval.exact}


def statistics_rows(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[dict]:
    """Long rows (one per configuration x instance x ``STAT_QUANTITIES`` metric, level "instance", plus one per
    configuration x metric pooled over instances, level "pooled") of the completed runs: n, mean and 95%
    bootstrap interval over seeds; pooled: the mean of the instance means and the stratified interval (seeds
    resampled within each instance, instances fixed)."""
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
            strata = []
            for instance, members in instances.items():
                kept = [r for r in members if values[id(r)][col] is not None]
                strata.append([values[id(r)][col] for r in kept])
                interval = bootstrap_interval(strata[-1])
                rows.append({**base, "level": "instance", "instance": instance, "metric": col, "n_instances": 1,
                             "n": interval.n, "seeds": " ".join(str(r.seed) for r in kept),
                             **interval_fields(interval)})
            interval = stratified_interval(strata)
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
    """Write dict rows as CSV (columns: union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


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


