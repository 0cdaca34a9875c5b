"""Report of a sweep: tables (Markdown, CSV), over-optimization figures (PNG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--wandb-project ENTITY/PROJECT] [--no-seeds]

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

Only completed runs (``result.json`` with status "completed" and a non-empty
``metrics.jsonl``) enter tables and figures (a figure only for the tasks whose runs have its metric: a task
without a golden reward, such as task=preference, has held-out pair metrics and no win rate); every other run is listed in
``report.md`` with the reason (no result.json, status != completed, empty
metrics, unreadable files, duplicate of another run).

Writes into ``--out`` (default ``<sweep dir>/report``): ``report.md``,
``summary.csv`` (one row per configuration: task x loss x beta x any other
swept setting), ``runs.csv`` (one row per run,
failed ones included) and per task ``overopt_<task>.png``,
``win_rate_vs_step_<task>.png``, ``kl_vs_step_<task>.png``, ``eval_loss_vs_step_<task>.png``,
``eval_accuracy_vs_step_<task>.png``.
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

from isdpo.report_plots import FIGURE_KEYS, FIGURES, loss_order, save_figure, series_colours
from isdpo.schema import flatten

RESULT, METRICS, HYDRA_CONFIG, HYDRA_OVERRIDES = "result.json", "metrics.jsonl", ".hydra/config.yaml", \
    ".hydra/overrides.yaml"

#: Top-level config keys that say where and under which name a run wrote, not what it computed: they never
#: tell two runs apart.
BOOKKEEPING = ("paths", "run_name", "experiment", "logger", "hydra", "stage")
#: Config keys of the fixed table columns (task is the section); "seed" is what the table averages over.
BASE_KEYS, SEED_KEY = ("task.name", "loss.name", "beta"), "seed"


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
    config: dict[str, Any] | None = None  # .hydra/config.yaml flattened ("a.b.c" -> value), as written
    # Set by ``assign_variants`` (from the whole sweep): the swept settings shown for this run (key -> value),
    # the values of every varying setting but the seed (what the tables group by), and the legend label.
    variant: dict[str, Any] = field(default_factory=dict)
    group: tuple = ()
    series: str | None = None

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


def load_sweep(root: Path, exclude: Path | None = None) -> list[Run]:
    """All runs under ``root``, with their variants assigned; of two completed runs with the same config (seed
    included) the newer is kept and the older marked duplicate, so a rerun is never averaged with itself."""
    root = Path(root)
    runs = [load_run(folder, root) for folder in discover(root, exclude)]
    newest: dict[tuple, Run] = {}
    for run in sorted((r for r in runs if r.ok), key=lambda r: (r.path / RESULT).stat().st_mtime):
        if run.key in newest:
            older = newest[run.key]
            same = "config (seed included)" if run.config is not None else "task/loss/beta/seed"
            older.status, older.reason = "duplicate", f"same {same} as {run.name} (newer, kept)"
        newest[run.key] = run
    assign_variants(runs)
    return runs


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


def assign_variants(runs: list[Run]) -> list[str]:
    """Set each run's ``group``, ``variant`` and ``series`` from the settings that vary across ``runs``.

    ``group`` holds every varying setting (the tables group by it); ``variant`` only those needed to tell the
    groups apart: a setting that follows from task/loss/beta and the settings already shown (the loss's own
    parameters under ``loss=dpo,isdpo``) gets no column. Returns the keys of ``variant``.
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
    names = short_names(shown)
    for run in runs:
        run.group = tuple(_hashable(_value(run, k)) for k in varying)
        run.variant = {k: _value(run, k) for k in shown}
        run.series = ", ".join([str(run.loss)] + [f"{names[k]}={format_value(v)}" for k, v in run.variant.items()])
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


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n); std is NaN for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def summarise(runs: list[Run]) -> list[dict]:
    """One row per configuration (task, loss, beta and the other varying settings) of the completed runs: the
    shown settings (``Run.variant``, as text), seeds and mean/std/n of each ``RUN_QUANTITIES``."""
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
        for col, (_, _, get) in RUN_QUANTITIES.items():
            values = [v for v in (get(r.result) for r in group) if v is not None]
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = mean_std(values)
        rows.append(row)
    return rows


def _cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if not math.isnan(std) else "")


def setting_columns(rows: list[dict]) -> list[str]:
    """The swept-setting columns of ``summarise`` rows (config keys such as ``loss.importance_sampling.log_clip``)."""
    fixed = {"task", "loss", "beta", "n_seeds", "seeds"} | {f"{c}_{s}" for c in RUN_QUANTITIES
                                                            for s in ("mean", "std", "n")}
    return [k for k in (rows[0] if rows else {}) if k not in fixed]


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of ``summarise`` rows of one task: the swept settings that vary among these rows, then
    mean ± std per quantity.

    The best final win rate at each beta is in bold.
    A column appears only when some run has its value (the judge's, the win rate's on a task without a
    golden reward); the judge's cell names its own n when fewer seeds were judged than trained.
    """
    settings = [k for k in setting_columns(rows) if len({r[k] for r in rows}) > 1]
    cols = [c for c in RUN_QUANTITIES if any(r[f"{c}_n"] for r in rows)]
    header = ["loss", "β"] + [f"`{k}`" for k in settings] + [RUN_QUANTITIES[c][0] for c in cols] + ["n seeds"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * (2 + len(settings)) + ["---:"] * (len(cols) + 1)) + "|"]
    best = {}
    for r in rows:
        if not math.isnan(r["final_win_rate_mean"]):
            best[r["beta"]] = max(best.get(r["beta"], -math.inf), r["final_win_rate_mean"])
    for r in rows:
        cells = [f"`{r['loss']}`", f"{r['beta']:g}"] + [_md_escape(r[k]) for k in settings]
        for c in cols:
            text = _cell(r[f"{c}_mean"], r[f"{c}_std"], RUN_QUANTITIES[c][1])
            if c == "final_win_rate" and len(best) and r["final_win_rate_mean"] == best.get(r["beta"]) \
                    and sum(1 for o in rows if o["beta"] == r["beta"]) > 1:
                text = f"**{text}**"
            if c == "judge_win_rate" and 0 < r[f"{c}_n"] < r["n_seeds"]:
                text += f" (n={r[f'{c}_n']})"
            cells.append(text)
        cells.append(f"{r['n_seeds']} ({r['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
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
        for col, (_, _, get) in RUN_QUANTITIES.items():
            try:
                row[col] = get(run.result) if run.ok else None
            except (KeyError, TypeError, ValueError):
                row[col] = None
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

def make_figures(runs: list[Run], out: Path, show_seeds: bool = True) -> dict[str, list[tuple[Path, str]]]:
    """Draw and save every figure of ``report_plots.FIGURES`` per task; returns task -> [(png, caption)]."""
    done = [r for r in runs if r.ok]
    colours = series_colours(done)  # one mapping for all tasks and figures
    pngs: dict[str, list[tuple[Path, str]]] = {}
    for task in sorted({r.task or "" for r in done}):
        task_runs = [r for r in done if (r.task or "") == task]
        for stem, (plot, caption) in FIGURES.items():
            if not all(set(FIGURE_KEYS[stem]) <= set(row) for run in task_runs for row in run.metrics):
                continue  # a metric these runs do not have (no golden reward: no win rate)
            fig = plot(task_runs, colours, task=task, show_seeds=show_seeds)
            path = save_figure(fig, out / f"{stem}_{_slug(task or 'task')}.png")
            pngs.setdefault(task, []).append((path, caption))
    return pngs


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def build_report(sweep: Path, out: Path | None = None, wandb_project: str | None = None,
                 show_seeds: bool = True, figures: bool = True, log: Callable[[str], None] = print) -> Path:
    """Write report.md, summary.csv, runs.csv and (unless ``figures=False``) the PNGs for ``sweep`` into ``out``.

    Returns the path of report.md.
    """
    sweep = Path(sweep)
    out = Path(out) if out else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = load_sweep(sweep, exclude=out)
    if not runs:
        raise FileNotFoundError(f"no runs under {sweep} (no result.json, metrics.jsonl or .hydra/config.yaml)")
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "incomplete", "failed", "duplicate")}
    log(f"[report] {len(runs)} runs under {sweep}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))

    summary = summarise(runs)
    write_csv(out / "summary.csv", summary) if summary else (out / "summary.csv").write_text("")
    write_csv(out / "runs.csv", run_rows(runs))
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
               markdown_table([row for row in summary if row["task"] == task]), ""]
        for path, caption in pngs.get(task, []):
            md += [f"![{path.stem}]({path.name})", "", f"*{caption}*", ""]

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
           "any other swept setting (mean, std, n over seeds)",
           "- `runs.csv`: one row per run folder, failed ones included", ""]
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
    parser.add_argument("--no-seeds", action="store_true", help="draw only the seed means, not each seed")
    parser.add_argument("--no-figures", action="store_true", help="tables and run list only (fast)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"[report] not a directory: {args.sweep}", file=sys.stderr)
        return 2
    try:
        report = build_report(args.sweep, args.out, args.wandb_project, show_seeds=not args.no_seeds,
                              figures=not args.no_figures)
    except FileNotFoundError as err:
        print(f"[report] {err}", file=sys.stderr)
        return 2
    print(f"[report] wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
