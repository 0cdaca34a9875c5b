"""Report of a sweep: tables (Markdown, CSV), statistics with bootstrap intervals, paired claims, figures (PNG
and SVG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--instance-key KEY] [--wandb-project ENTITY/PROJECT] [--seeds]

A run is any folder under the sweep directory holding ``result.json``,
``metrics.jsonl`` or ``.hydra/config.yaml`` (what ``isdpo.stages`` and Hydra
write). Its loss, beta, seed and task come from ``result.json`` or else from
``.hydra/config.yaml`` (then ``.hydra/overrides.yaml``).

Runs are told apart by their whole config (``.hydra/config.yaml``), not only by
task/loss/beta/seed: the seeds of one configuration are averaged, and every
setting that varies across the sweep (bookkeeping such as ``paths.*`` aside)
becomes a table column and a legend label, e.g. ``loss.importance_sampling.log_clip``.
A run without a readable config is identified by ``result.json`` alone (said in
``report.md``). Of two completed runs with the same config and seed, the newer
counts and the older is listed as a duplicate.

Statistics (``isdpo.report_stats`` has the formulas): per configuration and task instance (``--instance-key``,
default ``task.chain_seed``) the mean and 95% bootstrap interval over seeds of the final and peak win rate, their
difference, the final KL and the largest KL of the curve; pooled over instances, the mean of the instance means
with a stratified interval. Claims: paired differences (instance, seed, beta and the other settings) of each
importance-sampled loss against its base loss and of each online loss against its offline and importance-sampled
counterparts, per instance and pooled, each with a sentence saying whether its interval excludes zero.

Only completed runs (``result.json`` with status "completed" and a non-empty
``metrics.jsonl``) enter tables, statistics and figures (a figure only for the runs that have its metric: a task
without a golden reward, such as task=preference, has held-out pair metrics and no win rate); every other run is
listed in ``report.md`` with the reason (no result.json, status != completed, empty
metrics, unreadable files, duplicate of another run). A NaN value is left out of means and intervals.

Writes into ``--out`` (default ``<sweep dir>/report``): ``report.md``,
``summary.csv`` (one row per configuration: task x loss x beta x any other
swept setting), ``runs.csv`` (one row per run, failed ones included), ``stats.csv``, ``claims.csv`` and per task
the figures of ``report_plots.FIGURES`` (``<stem>_<task>.png`` and ``.svg``; with several task instances also
``<stem>_<task>_per_instance`` for ``report_plots.PER_INSTANCE_FIGURES``), every file listed in report.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml  # PyYAML, a dependency of omegaconf

from isdpo.report_plots import FIGURE_KEYS, FIGURES, PER_INSTANCE_FIGURES, loss_order, save_figure, \
    series_colours, svg_path
from isdpo.report_stats import N_RESAMPLES, Interval, bootstrap_interval, claim, format_interval, interval_note, \
    pair_up, stratified_interval
from isdpo.schema import default_of, flatten

RESULT, METRICS, HYDRA_CONFIG, HYDRA_OVERRIDES = "result.json", "metrics.jsonl", ".hydra/config.yaml", \
    ".hydra/overrides.yaml"

#: Top-level config keys that say where and under which name a run wrote, not what it computed: they never
#: tell two runs apart.
BOOKKEEPING = ("paths", "run_name", "experiment", "logger", "hydra", "stage")
#: Config keys of the fixed table columns (task is the section); "seed" is what the table averages over.
BASE_KEYS, SEED_KEY = ("task.name", "loss.name", "beta"), "seed"
#: Config key that names the task instance (the synthetic task's chain): statistics are per instance and pooled
#: over instances; a sweep without the key has one instance.
INSTANCE_KEY = "task.chain_seed"


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One job folder: what it was (task, loss, beta, seed), whether it completed, and what it wrote."""

    path: Path
    name: str  # folder relative to the sweep directory
    task: str | None = None
    loss: str | None = None
    beta: float | None = None
    seed: int | None = None
    status: str = "completed"  # completed | incomplete | failed | duplicate
    reason: str = ""
    result: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # .hydra/config.yaml flattened ("a.b.c" -> value), as written; ``load_sweep`` adds the schema default of a key
    # other runs have and this one lacks (written by code older than the key)
    config: dict[str, Any] | None = None
    # Set by ``assign_variants`` (from the whole sweep): the swept settings shown for this run (key -> value),
    # the values of every varying setting but the seed (what the tables group by), and the legend label.
    variant: dict[str, Any] = field(default_factory=dict)
    group: tuple = ()
    series: str | None = None
    # Also set by ``assign_variants``: every varying setting (key -> hashable value), the task instance ("" when
    # the instance key is in no config; else e.g. "chain_seed=1") and its sort key, and the configuration pooled
    # over instances: ``config_group`` (``group`` without the instance key) and its legend label ``method``.
    settings: dict[str, Any] = field(default_factory=dict)
    instance: str = ""
    instance_order: tuple = ()
    config_group: tuple = ()
    method: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def key(self) -> tuple:
        """What the run computed: its config without bookkeeping (seed included); two equal keys are duplicates."""
        if self.config is None:
            return ("result.json", self.task, self.loss, self.beta, self.seed)
        return tuple(sorted((k, _hashable(v)) for k, v in self.config.items() if not is_bookkeeping(k)))

    @property
    def label(self) -> str:
        """Name of the run's configuration in legends: the loss, plus the swept settings when there are some."""
        return self.series or str(self.loss)

    @property
    def variant_order(self) -> tuple:
        return tuple(value_order(v) for v in self.variant.values())


class _Marker:
    """A variant value that is not a config value: the key is absent, or the run has no config at all."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


NOT_SET = _Marker("–")  # the key is not in this run's config
UNKNOWN = _Marker("?")  # the run has no readable .hydra/config.yaml


def is_bookkeeping(key: str) -> bool:
    return key.split(".")[0] in BOOKKEEPING


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def format_value(value) -> str:
    """A config value as a table cell / legend text, spelled as in the config (null, true, 0.5)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def value_order(value) -> tuple:
    """Sort key of config values of one setting: numbers ascending, then text, then null, then markers."""
    if isinstance(value, _Marker):
        return 3, 0.0, str(value)
    if value is None:
        return 2, 0.0, ""
    if isinstance(value, (int, float)):
        return 0, float(value), ""
    return 1, 0.0, format_value(value)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.\-]*)\}")


def resolve(flat: dict[str, Any], key: str, _depth: int = 0):
    """``flat[key]`` with its ``${other.key}`` interpolations replaced by the config's values where they can be.

    Resolver calls (``${oc.env:...}``, ``${hydra:...}``) and unknown keys stay as written.
    """
    value = flat.get(key)
    if not isinstance(value, str) or "${" not in value or _depth > 10:
        return value
    whole = _INTERPOLATION.fullmatch(value)
    if whole and whole.group(1) in flat:  # "${seed}" takes the referenced value with its type
        return resolve(flat, whole.group(1), _depth + 1)
    return _INTERPOLATION.sub(
        lambda m: format_value(resolve(flat, m.group(1), _depth + 1)) if m.group(1) in flat else m.group(0), value)


def discover(root: Path, exclude: Path | None = None) -> list[Path]:
    """Folders under ``root`` (``root`` included) that hold result.json, metrics.jsonl or .hydra/config.yaml.

    A run folder is not searched further: runs do not nest, and its checkpoints
    and policy folders are large.
    """
    root, found = Path(root), []
    exclude = exclude.resolve() if exclude else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve() == exclude:
            dirnames[:] = []
            continue
        if RESULT in filenames or METRICS in filenames or (here / HYDRA_CONFIG).is_file():
            found.append(here)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if d != ".hydra")
    return sorted(found)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl and the number of lines that did not parse.

    A run still being written can end in a half-written line; such lines are
    skipped (and counted) instead of failing the whole report. A row is an evaluation
    point with a golden win rate and KL, or with held-out pair metrics (``loss``), or both.
    """
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "step" in row and (("win_rate" in row and "kl" in row) or "loss" in row):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _to_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The flattened .hydra/config.yaml of a run folder as written (interpolations unresolved), or (None, why)."""
    path = folder / HYDRA_CONFIG
    if not path.is_file():
        return None, f"no {HYDRA_CONFIG}"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return None, f"{HYDRA_CONFIG} unreadable ({err.__class__.__name__})"
    if not isinstance(cfg, dict):
        return None, f"{HYDRA_CONFIG} is not a mapping"
    return flatten(cfg), ""


def _identity_from_hydra(folder: Path, config: dict[str, Any] | None) -> dict:
    """task, loss, beta, seed from the flattened .hydra/config.yaml, filled in from .hydra/overrides.yaml."""
    ident: dict[str, Any] = {}
    if config is not None:
        # Unresolvable interpolations stay strings here; _to_float / _to_int turn them into None.
        ident = {name: resolve(config, key) for name, key in
                 (("task", "task.name"), ("loss", "loss.name"), ("beta", "beta"), ("seed", SEED_KEY))}
    for key, value in read_overrides(folder):
        current = ident.get(key)
        if key in ("task", "loss", "beta", "seed") and (current in (None, "") or "${" in str(current)):
            ident[key] = value
    return ident


def read_overrides(folder: Path) -> list[tuple[str, str]]:
    """(key, value) of each line of .hydra/overrides.yaml (``+``/``~`` prefixes dropped); [] when unreadable."""
    try:
        items = yaml.safe_load((folder / HYDRA_OVERRIDES).read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(items, list):
        return []
    return [(key, value) for key, _, value in (str(item).lstrip("+~").partition("=") for item in items)]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def load_run(folder: Path, root: Path) -> Run:
    """Read one job folder into a ``Run`` and classify it (completed / incomplete / failed)."""
    folder = Path(folder)
    name = str(folder.relative_to(root)) if folder != Path(root) else folder.name
    run = Run(path=folder, name=name)
    run.metrics, bad = read_metrics(folder / METRICS)
    if bad:
        run.notes.append(f"{bad} malformed line(s) in metrics.jsonl skipped")

    result, result_error = None, None
    if (folder / RESULT).is_file():
        try:
            result = json.loads((folder / RESULT).read_text())
            if not isinstance(result, dict):
                result, result_error = None, "result.json is not a JSON object"
        except (OSError, json.JSONDecodeError) as err:
            result_error = f"result.json unreadable ({err.__class__.__name__}: {err})"
    run.result = result

    run.config, why = read_config(folder)
    if run.config is None and result is not None:
        run.notes.append(f"{why}: identified from result.json (task, loss, beta, seed) only; "
                         "the swept settings it cannot show are ? in the tables")
    ident = _identity_from_hydra(folder, run.config)
    src = result or {}
    run.task = src.get("task") or ident.get("task")
    run.loss = src.get("loss") or ident.get("loss")
    run.beta = _to_float(src.get("beta", ident.get("beta")))
    run.seed = _to_int(src.get("seed", ident.get("seed")))

    progress = ""
    if run.metrics:
        age = time.time() - (folder / METRICS).stat().st_mtime
        progress = (f"; {len(run.metrics)} eval points, last step {run.metrics[-1]['step']}, "
                    f"metrics.jsonl last written {_age(age)} ago")

    if result_error:
        run.status, run.reason = "failed", result_error + progress
    elif result is None:
        if run.metrics:
            run.status, run.reason = "incomplete", "no result.json (still running or crashed)" + progress
        elif (folder / METRICS).is_file():
            run.status, run.reason = "failed", "no result.json and empty metrics.jsonl"
        else:
            started = ""
            if (folder / HYDRA_CONFIG).is_file():
                age = _age(time.time() - (folder / HYDRA_CONFIG).stat().st_mtime)
                started = f"; .hydra written {age} ago (a job that has just started looks the same)"
            run.status = "failed"
            run.reason = "no result.json and no metrics.jsonl (crashed before the first evaluation?)" + started
    elif result.get("status") != "completed":
        detail = result.get("error") or result.get("message")
        run.status = "failed"
        run.reason = f"status = {result.get('status')!r}" + (f": {detail}" if detail else "") + progress
    elif not run.metrics or not result.get("final") or not result.get("peak"):
        run.status = "failed"
        run.reason = "empty metrics (" + ("no final/peak in result.json" if run.metrics
                                          else "metrics.jsonl missing or empty") + ")"
    elif run.loss is None or run.beta is None:
        run.status, run.reason = "failed", "loss or beta unknown (not in result.json nor .hydra)"
    return run


def load_sweep(root: Path, exclude: Path | None = None, instance_key: str = INSTANCE_KEY) -> list[Run]:
    """All runs under ``root``, with their variants assigned; of two completed runs with the same config (seed
    included) the newer is kept and the older marked duplicate, so a rerun is never averaged with itself."""
    root = Path(root)
    runs = [load_run(folder, root) for folder in discover(root, exclude)]
    fill_defaults(runs)
    newest: dict[tuple, Run] = {}
    for run in sorted((r for r in runs if r.ok), key=lambda r: (r.path / RESULT).stat().st_mtime):
        if run.key in newest:
            older = newest[run.key]
            same = "config (seed included)" if run.config is not None else "task/loss/beta/seed"
            older.status, older.reason = "duplicate", f"same {same} as {run.name} (newer, kept)"
        newest[run.key] = run
    assign_variants(runs, instance_key)
    return runs


def fill_defaults(runs: list[Run]) -> None:
    """Give each config the schema default of every key that another run's config has and it lacks: a run of
    code older than the key ran with what the default does, so it is neither a variant nor a new seed group.
    Keys without a schema default stay absent (``NOT_SET``)."""
    configs = [r.config for r in runs if r.config is not None]
    for key in sorted({k for config in configs for k in config}):
        lacking = [config for config in configs if key not in config]
        if not lacking:
            continue
        found, default = default_of(key)
        for config in lacking if found else ():
            config[key] = default


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the completed runs that have a config, except the seed,
    bookkeeping and ``BASE_KEYS``: swept keys (overrides.yaml) first, then in config order.

    Values are compared as written, interpolations unresolved: a setting derived from the seed
    (``task.data_seed: ${seed}``) is then the same in every run and does not split the seeds.
    """
    configs = [r.config for r in runs if r.ok and r.config is not None]
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    varying = [k for k in keys if k != SEED_KEY and k not in BASE_KEYS and not is_bookkeeping(k)
               and len({_hashable(c.get(k, NOT_SET)) for c in configs}) > 1]
    swept = []
    for run in runs:
        swept += [k for k, _ in read_overrides(run.path) if k in varying and k not in swept]
    return swept + [k for k in varying if k not in swept]


def _value(run: Run, key: str):
    """The setting as written (not resolved: grouping and display must agree, and ``${seed}`` differs by seed)."""
    if run.config is None:
        return UNKNOWN
    return run.config.get(key, NOT_SET)


def assign_variants(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[str]:
    """Set each run's ``group``, ``variant``, ``series`` and instance fields from the settings that vary across
    ``runs``.

    ``group`` holds every varying setting (the tables group by it); ``variant`` only those needed to tell the
    groups apart: a setting that follows from task/loss/beta and the settings already shown (the loss's own
    parameters under ``loss=dpo,isdpo``) gets no column. ``instance_key`` names the task instance (``Run.instance``;
    ``Run.config_group`` and ``Run.method`` leave it out). Returns the keys of ``variant``.
    """
    varying = varying_keys(runs)
    done = [r for r in runs if r.ok]
    shown: list[str] = []
    for key in varying:
        seen: dict[tuple, Any] = {}
        for run in done:
            known = (run.task, run.loss, run.beta) + tuple(_hashable(_value(run, k)) for k in shown)
            if seen.setdefault(known, _hashable(_value(run, key))) != _hashable(_value(run, key)):
                shown.append(key)
                break
    names = short_names(shown + [instance_key])
    has_instances = any(r.config is not None and instance_key in r.config for r in runs)
    for run in runs:
        run.settings = {k: _hashable(_value(run, k)) for k in varying}
        run.group = tuple(run.settings.values())
        run.config_group = tuple(v for k, v in run.settings.items() if k != instance_key)
        run.variant = {k: _value(run, k) for k in shown}
        run.series = ", ".join([str(run.loss)] + [f"{names[k]}={format_value(v)}" for k, v in run.variant.items()])
        run.method = ", ".join([str(run.loss)] + [f"{names[k]}={format_value(v)}" for k, v in run.variant.items()
                                                  if k != instance_key])
        value = resolve(run.config, instance_key) if run.config is not None and instance_key in run.config \
            else _value(run, instance_key)
        run.instance = f"{names[instance_key]}={format_value(value)}" if has_instances else ""
        run.instance_order = value_order(value)
    return shown


def short_names(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that no other key ends with ("loss.importance_sampling.log_clip" ->
    "log_clip"), for legends."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(other != key and (other == name or other.endswith("." + name)) for other in keys):
                break
        names[key] = name
    return names


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------

def _judge(result: dict) -> float | None:
    judge = result.get("judge")
    return _to_float(judge.get("win_rate")) if isinstance(judge, dict) else None


def _point(result: dict, which: str, key: str) -> float | None:
    """``result[which][key]`` (which: final | peak) as a float; None when the run has no such metric."""
    row = result.get(which)
    return _to_float(row.get(key)) if isinstance(row, dict) else None


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
    kls = [v for v in (_to_float(row.get("kl")) for row in run.metrics) if v is not None and math.isfinite(v)]
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
        cells = [f"`{r['loss']}`", f"{r['beta']:g}"] + [_md_escape(r[k]) for k in settings]
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


# ----------------------------------------------------------------------------------------------------------
# Statistics: per instance, pooled over instances, paired differences and claims
# ----------------------------------------------------------------------------------------------------------

def _config_key(run: Run) -> tuple:
    """A configuration pooled over task instances: task, loss, beta and every varying setting but the instance."""
    return run.task or "", run.loss, run.beta, run.config_group


def _by_instance(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs grouped by task instance, instances and seeds in order."""
    out: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.instance_order, r.seed is None, r.seed)):
        out.setdefault(run.instance, []).append(run)
    return out


def _shown(run: Run, instance_key: str) -> dict[str, str]:
    """The run's shown settings except the instance key, as text."""
    return {k: format_value(v) for k, v in run.variant.items() if k != instance_key}


def _interval_fields(interval: Interval) -> dict[str, Any]:
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
        instances = _by_instance(groups[key])
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
                             **_interval_fields(interval)})
            interval = stratified_interval(strata)
            rows.append({**base, "level": "pooled", "instance": f"pooled over {len(instances)}", "metric": col,
                         "n_instances": interval.n_strata, "n": interval.n, "seeds": "",
                         **_interval_fields(interval)})
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
        lines.append("| " + " | ".join([f"`{loss}`", f"{beta:g}"] + [_md_escape(str(first.get(k, "")))
                                                                     for k in settings] + count + texts) + " |")
    return "\n".join(lines)


def loss_traits(run: Run) -> tuple[bool, bool, str]:
    """(importance sampling on, online, base loss) of a run's loss, from its config (loss.importance_sampling.enabled,
    loss.online, loss.base); without them, from the name ("is" prefix: importance-sampled, "online_" prefix: online,
    the rest: the base)."""
    name, cfg = str(run.loss), run.config or {}
    weighted = resolve(cfg, "loss.importance_sampling.enabled") if cfg else None
    online = resolve(cfg, "loss.online") if cfg else None
    base = resolve(cfg, "loss.base") if cfg else None
    weighted = weighted if isinstance(weighted, bool) else name.startswith("is")
    online = online if isinstance(online, bool) else name.startswith("online_")
    if not isinstance(base, str) or "${" in base:
        base = name.removeprefix("online_")
        base = base.removeprefix("is") if weighted else base
    return weighted, online, base


def comparisons(runs: list[Run]) -> list[tuple[str, str]]:
    """(a, b) loss-name pairs compared as a - b: each importance-sampled loss against its base (same loss.base,
    importance sampling off, offline; preferring the name without the "is" prefix, which is also the fallback),
    and each online loss against the offline loss and the importance-sampled loss of its base."""
    traits: dict[str, tuple[bool, bool, str]] = {}
    for run in runs:
        if run.ok and run.loss:
            traits.setdefault(run.loss, loss_traits(run))
    plain = [n for n, (w, o, _) in traits.items() if not w and not o]
    weighted = [n for n, (w, o, _) in traits.items() if w and not o]

    def pick(candidates: list[str], preferred: str) -> str | None:
        if preferred in candidates:
            return preferred
        return candidates[0] if len(candidates) == 1 else None

    out = []
    for name in loss_order(weighted):
        stem = name.removeprefix("is")
        other = pick([n for n in plain if traits[n][2] == traits[name][2]], stem)
        other = other or (stem if stem != name and stem in traits else None)
        out += [(name, other)] if other else []
    for name in loss_order([n for n, (w, o, _) in traits.items() if o and not w]):
        stem = name.removeprefix("online_")
        same_base = [n for n in plain if traits[n][2] == traits[name][2]]
        out += [(name, other) for other in (pick(same_base, stem),
                                            pick([n for n in weighted if traits[n][2] == traits[name][2]],
                                                 "is" + stem)) if other]
    return out


def _is_loss_identity(key: str) -> bool:
    """Settings that make two losses different methods, so pairs need not agree on them."""
    return key in ("loss.name", "loss.base", "loss.online") or key.startswith("loss.importance_sampling.")


def claim_rows(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[dict]:
    """Paired differences a - b (``comparisons``) of every ``STAT_QUANTITIES`` metric, per instance and (with
    more than one instance) pooled, with the claim each interval supports.

    Runs are paired by task, beta, instance, seed and every other varying setting except the loss's identity
    (name, base, online, importance sampling); the loss's own parameters must agree. A run without a partner is
    left out and counted (``n_unpaired``, ``unpaired``).
    """
    done = [r for r in runs if r.ok]
    names = short_names(list(done[0].variant) + [instance_key]) if done else {}
    values = {id(r): run_values(r) for r in done}
    rows = []
    for task in sorted({r.task or "" for r in done}):
        task_runs = [r for r in done if (r.task or "") == task]
        for a_name, b_name in comparisons(task_runs):
            def sides(loss: str) -> dict[tuple, list[Run]]:
                out: dict[tuple, list[Run]] = {}
                for run in task_runs:
                    if run.loss == loss:
                        context = tuple((k, v) for k, v in run.settings.items()
                                        if k != instance_key and not _is_loss_identity(k))
                        label = ", ".join([loss] + [f"{names[k]}={format_value(v)}" for k, v in run.variant.items()
                                                    if k.startswith("loss.") and k != instance_key])
                        out.setdefault((label, run.beta, context), []).append(run)
                return out

            a_sides, b_sides = sides(a_name), sides(b_name)
            for (a_label, beta, context), a_runs in sorted(a_sides.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                matches = [(b_label, b_runs) for (b_label, b_beta, b_context), b_runs in b_sides.items()
                           if b_beta == beta and b_context == context] or [(b_name, [])]
                shown = [f"{names[k]}={format_value(v)}" for k, v in a_runs[0].variant.items()
                         if not k.startswith("loss.") and k != instance_key]
                where = ", ".join([f"beta={beta:g}"] + shown)
                for b_label, b_runs in matches:
                    rows += _pair_claims(task, a_label, b_label, beta, where, a_runs, b_runs, values)
    return rows


def _pair_claims(task: str, a: str, b: str, beta: float, where: str, a_runs: list[Run], b_runs: list[Run],
                 values: dict[int, dict]) -> list[dict]:
    """The claim rows of one comparison in one context (beta and settings), per instance and pooled."""
    a_inst, b_inst = _by_instance(a_runs), _by_instance(b_runs)
    instances = list(_by_instance(a_runs + b_runs))
    rows = []
    for col in STAT_QUANTITIES:
        metric, fmt = TABLE_QUANTITIES[col][0], TABLE_QUANTITIES[col][1]
        strata, unpaired_all = [], []
        base = {"task": task, "comparison": f"{a} - {b}", "a": a, "b": b, "beta": beta, "context": where,
                "metric": col}
        for instance in instances:
            diffs, only_a, only_b = pair_up({r.seed: values[id(r)][col] for r in a_inst.get(instance, [])},
                                            {r.seed: values[id(r)][col] for r in b_inst.get(instance, [])})
            unpaired = [f"{a} seed {s}" for s in only_a] + [f"{b} seed {s}" for s in only_b]
            unpaired_all += [f"{u} ({instance})" if instance else u for u in unpaired]
            strata.append(list(diffs.values()))
            interval = bootstrap_interval(strata[-1])
            context = ", ".join(p for p in (where, instance) if p)
            rows.append({**base, "level": "instance", "instance": instance, "n_pairs": interval.n,
                         "n_unpaired": len(unpaired), "unpaired": "; ".join(unpaired), **_interval_fields(interval),
                         "verdict": interval.verdict,
                         "claim": claim(context, a, b, metric, interval, fmt=fmt, unpaired=len(unpaired))})
        if len(instances) > 1:
            interval = stratified_interval(strata)
            context = f"{where}, pooled over {', '.join(instances)} (instances fixed)"
            rows.append({**base, "level": "pooled", "instance": f"pooled over {len(instances)}",
                         "n_pairs": interval.n, "n_unpaired": len(unpaired_all), "unpaired": "; ".join(unpaired_all),
                         **_interval_fields(interval), "verdict": interval.verdict,
                         "claim": claim(context, a, b, metric, interval, fmt=fmt, unit="pairs",
                                        unpaired=len(unpaired_all))})
    return rows


def claims_markdown(rows: list[dict]) -> list[str]:
    """The Claims section's lines for one task: per comparison, the pooled claims (when there are several
    instances) as a list and the per-instance ones (folded when pooled ones are shown)."""
    lines: list[str] = []
    for comparison in dict.fromkeys(r["comparison"] for r in rows):
        mine = [r for r in rows if r["comparison"] == comparison]
        pooled = [r for r in mine if r["level"] == "pooled"]
        per_instance = [r for r in mine if r["level"] == "instance"]
        lines += [f"#### `{comparison}`", ""]
        lines += [f"- {_md_escape(r['claim'])}" for r in pooled] + ([""] if pooled else [])
        if pooled:
            lines += ["<details><summary>Per instance</summary>", ""]
        lines += [f"- {_md_escape(r['claim'])}" for r in per_instance] + [""]
        if pooled:
            lines += ["</details>", ""]
    return lines


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


# ----------------------------------------------------------------------------------------------------------
# W&B
# ----------------------------------------------------------------------------------------------------------

def fetch_wandb(project: str, timeout_s: float = 60.0) -> tuple[list[dict], str | None]:
    """Summaries of the runs of a W&B project: (rows, None) or ([], a message saying why not).

    Runs in a daemon thread with an overall deadline: without network the W&B
    client retries for minutes, and the local report must not wait on it.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            import wandb

            api = wandb.Api(timeout=int(min(timeout_s, 30)))
            rows = []
            for run in api.runs(project):
                cfg = dict(run.config or {})
                summary = getattr(run, "summary_metrics", None)
                if summary is None:
                    summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
                loss = cfg.get("loss", {}).get("name") if isinstance(cfg.get("loss"), dict) else cfg.get("loss")
                task = cfg.get("task", {}).get("name") if isinstance(cfg.get("task"), dict) else cfg.get("task")
                rows.append({"name": run.name, "state": getattr(run, "state", None),
                             "job_type": getattr(run, "job_type", None), "group": getattr(run, "group", None),
                             "task": task, "loss": loss, "beta": cfg.get("beta"), "seed": cfg.get("seed"),
                             "win_rate": summary.get("eval/win_rate"), "kl": summary.get("eval/kl"),
                             "step": summary.get("eval/step", summary.get("trainer/global_step")),
                             "url": getattr(run, "url", None)})
            box["rows"] = rows
        except Exception as err:  # noqa: BLE001 - any failure (no key, no network, bad project) becomes a message
            box["error"] = f"{err.__class__.__name__}: {err}".strip()

    thread = threading.Thread(target=work, daemon=True, name="wandb-fetch")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return [], f"no answer from W&B within {timeout_s:.0f} s (no network?)"
    if "error" in box:
        return [], box["error"]
    return box.get("rows", []), None


def wandb_markdown(project: str, rows: list[dict], error: str | None) -> str:
    """The W&B section of report.md: a table of run summaries, or why there is none."""
    lines = [f"## W&B project `{project}`", ""]
    if error:
        return "\n".join(lines + [f"Could not fetch runs from W&B: {error}", ""])
    if not rows:
        return "\n".join(lines + ["No runs in this project.", ""])
    lines += ["| run | state | job | task | loss | β | seed | eval/win_rate | eval/kl |",
              "|---|---|---|---|---|---:|---:|---:|---:|"]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    for r in rows:
        lines.append(f"| {r['name']} | {r['state'] or '–'} | {r['job_type'] or '–'} | {r['task'] or '–'} | "
                     f"{r['loss'] or '–'} | {r['beta'] if r['beta'] is not None else '–'} | "
                     f"{r['seed'] if r['seed'] is not None else '–'} | {num(r['win_rate'], '.3f')} | "
                     f"{num(r['kl'], '.3g')} |")
    return "\n".join(lines + [""])


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def make_figures(runs: list[Run], out: Path, show_seeds: bool = False) -> dict[str, list[tuple[Path, str]]]:
    """Draw and save (PNG and SVG) every figure of ``report_plots.FIGURES`` per task, and the per-instance variant
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def statistics_section(stats: list[dict], claims: list[dict], instance_key: str = INSTANCE_KEY) -> list[str]:
    """The Statistics and Claims sections of report.md (lines)."""
    if not stats:
        return []
    md = ["## Statistics", "",
          f"Mean [95% interval] per configuration and task instance (`{instance_key}`), then pooled over "
          "instances: the mean of the instance means, its interval from a stratified bootstrap (seeds resampled "
          f"within each instance, instances fixed). Intervals: {interval_note()}; pooled: "
          f"{N_RESAMPLES:,} stratified resamples (all of them when fewer). Final = last evaluation point, peak = "
          "evaluation point of highest golden win rate, max KL over the whole curve (metrics.jsonl). Failed "
          "runs are not in these numbers (listed below).", ""]
    for task in sorted({r["task"] for r in stats}):
        rows = [r for r in stats if r["task"] == task]
        several = any(r["level"] == "pooled" and r["n_instances"] > 1 for r in rows)
        md += [f"### Task `{task or '?'}`", "", "Per instance:" if several else "Per configuration:", "",
               statistics_markdown(rows, "instance", instance_key), ""]
        if several:
            md += ["Pooled over instances:", "", statistics_markdown(rows, "pooled", instance_key), ""]
    md += ["## Claims", "",
           "Paired differences a − b: runs paired by instance, seed, β and every other setting; the mean "
           "difference and its 95% bootstrap interval over the pairs (pooled: stratified by instance). Runs "
           "without a partner are left out and counted. An interval that excludes zero shows a difference at "
           "this level (no correction for the many comparisons made).", ""]
    if not claims:
        md += ["No comparison: the sweep has no importance-sampled or online loss together with its base.", ""]
    for task in sorted({r["task"] for r in claims}):
        md += [f"### Task `{task or '?'}`", ""] + claims_markdown([r for r in claims if r["task"] == task])
    return md


def build_report(sweep: Path, out: Path | None = None, wandb_project: str | None = None,
                 show_seeds: bool = False, figures: bool = True, log: Callable[[str], None] = print,
                 instance_key: str = INSTANCE_KEY) -> Path:
    """Write report.md, summary.csv, runs.csv, stats.csv, claims.csv and (unless ``figures=False``) the figures
    (PNG and SVG) for ``sweep`` into ``out``. ``instance_key``: the config key naming the task instance.

    Returns the path of report.md.
    """
    sweep = Path(sweep)
    out = Path(out) if out else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = load_sweep(sweep, exclude=out, instance_key=instance_key)
    if not runs:
        raise FileNotFoundError(f"no runs under {sweep} (no result.json, metrics.jsonl or .hydra/config.yaml)")
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "incomplete", "failed", "duplicate")}
    log(f"[report] {len(runs)} runs under {sweep}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))

    summary = summarise(runs)
    write_csv(out / "summary.csv", summary) if summary else (out / "summary.csv").write_text("")
    write_csv(out / "runs.csv", run_rows(runs))
    stats, claims = statistics_rows(runs, instance_key), claim_rows(runs, instance_key)
    for name, rows in (("stats.csv", stats), ("claims.csv", claims)):
        write_csv(out / name, rows) if rows else (out / name).write_text("")
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
                     "(from `.hydra/config.yaml`, as written): one row per configuration; – = not in that run's "
                     "config, ? = run without a config." if setting_columns(summary) else "")
    for task in sorted({row["task"] for row in summary}):
        md += [f"## Task `{task or '?'}`", "",
               "Mean ± sample standard deviation over seeds, from each run's `result.json` "
               "(final = last evaluation point, peak = evaluation point of highest golden win rate, or without "
               "one of highest held-out accuracy; held-out = the pair metrics on held-out pairs). "
               "Peak − final win rate is the over-optimization indicator: large means the policy got worse "
               "after its best point. Bold: best final win rate at that β." + settings_note, "",
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
            md.append(f"| `{_md_escape(r.name)}` | {r.loss or '?'} | {r.beta if r.beta is not None else '?'} | "
                      f"{r.seed if r.seed is not None else '?'} | {r.status} | {_md_escape(r.reason)} |")
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
           "(mean paired difference, interval, verdict, the sentence)"]
    md += [f"- `{path.name}`, `{svg_path(path).name}`: {caption.split('.')[0]}"
           for task in sorted(pngs) for path, caption in pngs[task]] + [""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    if problems:
        log(f"[report] {len(problems)} run(s) not completed, listed in report.md")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isdpo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="sweep directory (e.g. multirun/overopt) or a single run folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/report)")
    parser.add_argument("--wandb-project", default=None, metavar="ENTITY/PROJECT",
                        help="also list the run summaries of this W&B project (needs network and a key)")
    parser.add_argument("--seeds", action="store_true",
                        help="also draw each seed as a thin line in the against-step figures")
    parser.add_argument("--no-seeds", action="store_true",
                        help="draw only the means and bands (the default; kept for old command lines)")
    parser.add_argument("--instance-key", default=INSTANCE_KEY, metavar="KEY",
                        help=f"config key naming the task instance (default {INSTANCE_KEY}; statistics are per "
                             "instance and pooled over instances; a sweep without the key has one instance)")
    parser.add_argument("--no-figures", action="store_true", help="tables and run list only (fast)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"[report] not a directory: {args.sweep}", file=sys.stderr)
        return 2
    try:
        report = build_report(args.sweep, args.out, args.wandb_project, show_seeds=args.seeds and not args.no_seeds,
                              figures=not args.no_figures, instance_key=args.instance_key)
    except FileNotFoundError as err:
        print(f"[report] {err}", file=sys.stderr)
        return 2
    print(f"[report] wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
