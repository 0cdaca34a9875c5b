"""W&B as the surface on which runs are compared, beyond the metrics the trainer logs:

- :func:`define_metrics`: the ``train/*``, ``eval/*``, ``perf/*`` and ``reward/*`` families on the global step
  (``trainer/global_step``), with summaries that mean something (a win rate's max, a held-out loss's min);
- :func:`run_summary`: an align run's final and peak evaluation points, the drop from the peak, the largest KL
  and its status, as summary keys (``final/*``, ``peak/*``, ``drop/*``, ``max/*``, ``status``);
- :func:`curve_table`: the over-optimization curve, one row per evaluation point, as a W&B Table;
- :func:`log_report`: a sweep report's figures and tables as a W&B run of job_type ``report``.

``wandb`` is imported only where a W&B run is written (it costs ~0.6 s to import).
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

STEP = "trainer/global_step"  # Lightning's WandbLogger adds it to every row it logs: the x-axis of every family
FAMILIES = ("train/*", "eval/*", "perf/*", "reward/*")
# The summary W&B keeps of a logged metric (default: its last value): the best value over the curve as well
# where "best" has a direction, so the runs table can sort runs by it.
SUMMARIES = {
    **{f"eval/{k}": "max,last" for k in ("win_rate", "win_rate_a", "win_rate_b", "golden_reward",
                                         "golden_reward_a", "golden_reward_b", "rewards/accuracies",
                                         "rewards/margins", "kl", "sqrt_kl")},
    "eval/loss": "min,last", "train/loss": "min,last", "train/base_loss": "min,last",
    "reward/val_accuracy": "max,last", "reward/val_loss": "min,last",
}
CURVE_TABLE = "curve"  # the W&B key of the curve's table


def wandb_module():
    """The ``wandb`` package, imported on first use (runs that log elsewhere never pay for it)."""
    import wandb

    return wandb


def wandb_mode(mode: str) -> str:
    """``auto``: online only when a key is configured, so a run never fails for lack of network."""
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb rejects an empty mode
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path(os.path.expanduser("~/.netrc")).exists() and (
        "api.wandb.ai" in Path(os.path.expanduser("~/.netrc")).read_text()
    )
    return "online" if has_key else "offline"


def wandb_run(logger):
    """The W&B run behind a Lightning logger: None for another logger, and on a rank other than zero (where
    Lightning's WandbLogger hands out a stand-in that records nothing)."""
    if not logger or type(logger).__name__ != "WandbLogger":
        return None
    run = logger.experiment
    return None if type(run).__name__ == "DummyExperiment" else run


def define_metrics(logger) -> None:
    """Each family on the global step, and :data:`SUMMARIES`; nothing without a W&B run."""
    run = wandb_run(logger)
    if run is None:
        return
    run.define_metric(STEP)
    for family in FAMILIES:
        run.define_metric(family, step_metric=STEP, step_sync=True)
    for name, summary in SUMMARIES.items():
        run.define_metric(name, step_metric=STEP, step_sync=True, summary=summary)


def with_sqrt_kl(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with ``sqrt_kl`` after ``kl`` (the x-axis of the paper's over-optimization figure)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        out[k] = v
        if k == "kl" and _number(v):
            out["sqrt_kl"] = math.sqrt(max(float(v), 0.0))
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_summary(status: str, rows: Sequence[Mapping[str, Any]], peak: Mapping[str, Any] | None,
                peak_by: str | None) -> dict[str, Any]:
    """The summary keys of an align run from its curve (``rows``, metrics.jsonl) and its peak point (by
    ``peak_by``, as result.json): every number of the last point as ``final/<key>`` and of the peak as
    ``peak/<key>`` (``peak/step`` is the peak's step), ``drop/<peak_by>`` = peak - final, ``max/kl`` and
    ``max/sqrt_kl`` over the curve, ``n_eval_points`` and ``status`` (completed, interrupted, failed)."""
    out: dict[str, Any] = {"status": status, "n_eval_points": len(rows)}
    final = rows[-1] if rows else None
    for name, row in (("final", final), ("peak", peak)):
        out.update({f"{name}/{k}": v for k, v in with_sqrt_kl(row or {}).items() if _number(v)})
    if final is not None and peak is not None and peak_by and _number(final.get(peak_by)):
        out[f"drop/{peak_by}"] = peak[peak_by] - final[peak_by]
        out["peak_by"] = peak_by
    kls = [float(r["kl"]) for r in rows if _number(r.get("kl"))]
    if kls:
        out["max/kl"] = max(kls)
        out["max/sqrt_kl"] = math.sqrt(max(max(kls), 0.0))
    return out


def curve_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows (with ``sqrt_kl``), in the order they first appear."""
    return list(dict.fromkeys(k for r in rows for k in with_sqrt_kl(r)))


def curve_table(rows: Sequence[Mapping[str, Any]]):
    """The curve as a ``wandb.Table``: a column per metric, a row per evaluation point (None where a point
    lacks a metric)."""
    columns = curve_columns(rows)
    data = [[with_sqrt_kl(r).get(c) for c in columns] for r in rows]
    return wandb_module().Table(columns=columns, data=data)


def write_run_summary(logger, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    """``summary`` into the W&B run's summary and the curve ``rows`` as its table (key ``curve``, at the last
    point's step); False when there is no W&B run."""
    run = wandb_run(logger)
    if run is None:
        return False
    if rows:
        run.log({CURVE_TABLE: curve_table(rows), STEP: rows[-1].get("step", 0)})
    run.summary.update(dict(summary))
    return True


def log_report(report_dir: str | Path, figures: Sequence[str | Path] = (), tables: Sequence[str | Path] = (), *,
               group: str, project: str = "isdpo", entity: str | None = None, mode: str = "auto",
               name: str | None = None, config: Mapping[str, Any] | None = None) -> str:
    """Log a report as a W&B run of job_type ``report`` in ``group``; returns the run's id.

    ``figures``: PNG/JPEG files become images (``figures/<file stem>``), any other (SVG, PDF) is saved as a file
    of the run; ``tables``: CSV files become W&B Tables (``tables/<file stem>``). The run's files go under
    ``report_dir/wandb``; its id is a hash of ``report_dir``, so logging the same report again continues one run.
    """
    wandb = wandb_module()
    report_dir = Path(report_dir)
    run_id = "report-" + hashlib.sha256(str(report_dir.resolve()).encode()).hexdigest()[:10]
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=name or f"report-{group}",
                     id=run_id, resume="allow", dir=str(report_dir), mode=wandb_mode(mode),
                     config=dict(config or {}))
    try:
        row: dict[str, Any] = {}
        for path in map(Path, figures):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                row[f"figures/{path.stem}"] = wandb.Image(str(path))
            else:  # W&B's images are raster images
                run.save(str(path), base_path=str(path.parent), policy="now")
        for path in map(Path, tables):
            with path.open(newline="") as fh:
                header, *body = list(csv.reader(fh))
            row[f"tables/{path.stem}"] = wandb.Table(columns=header, data=typed_columns(body, len(header)))
        if row:
            run.log(row)
    finally:
        run.finish()
    return run_id


def typed_columns(body: Sequence[Sequence[str]], width: int | None = None) -> list[list[Any]]:
    """CSV rows, ``width`` cells each (default: the longest row's), with each column as numbers when every filled
    cell of it is one (W&B then sorts and plots it; a W&B Table refuses a column of mixed types), else as text;
    an empty cell is None."""
    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    width = max((len(r) for r in body), default=0) if width is None else width
    cells = [(list(r) + [""] * width)[:width] for r in body]
    numeric = [all(not r[j].strip() or number(r[j]) is not None for r in cells) for j in range(width)]
    return [[None if not v.strip() else number(v) if numeric[j] else v for j, v in enumerate(r)] for r in cells]
