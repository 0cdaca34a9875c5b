"""The report and W&B: the run summaries of a W&B project, fetched with a deadline, as a section of report.md; and
the finished report logged into the sweep's W&B group as a run of job_type ``report`` (``isdpo.tracking``)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from isdpo.report.runs import Run, resolve
from isdpo.tracking import log_report

#: The report's CSV files logged as W&B Tables (an empty one, e.g. claims.csv of a sweep without comparisons, is not)
REPORT_TABLES = ("summary.csv", "stats.csv", "claims.csv", "runs.csv")


def summary_number(summary: Mapping[str, Any], key: str, part: str = "last") -> float | None:
    """The ``part`` ("last", "max") of a number of a W&B run summary: ``summary[key]["max"]`` where the summary
    holds several (``define_metric(summary="max,last")``), a plain number being the last value; None when absent."""
    value = summary.get(key)
    if isinstance(value, Mapping):
        value = value.get(part)
    elif part != "last":  # W&B's default summary is the last value: it says nothing of the max
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def first_number(summary: Mapping[str, Any], *keys: tuple[str, str]) -> float | None:
    """The first number found among (key, part) pairs of a run summary."""
    for key, part in keys:
        value = summary_number(summary, key, part)
        if value is not None:
            return value
    return None


def summary_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the report shows of an align run's W&B summary: the ``final/*``, ``peak/*``, ``drop/*``, ``max/kl`` and
    ``status`` keys of ``isdpo.tracking.run_summary``; a run of older code has only its ``eval/*`` metrics (a
    scalar: the last value; or ``{"max", "last"}``) and the global step."""
    return {"win_rate": first_number(summary, ("final/win_rate", "last"), ("eval/win_rate", "last")),
            "kl": first_number(summary, ("final/kl", "last"), ("eval/kl", "last")),
            "step": first_number(summary, ("final/step", "last"), ("trainer/global_step", "last")),
            "peak_win_rate": first_number(summary, ("peak/win_rate", "last"), ("eval/win_rate", "max")),
            "drop": summary_number(summary, "drop/win_rate"),
            "max_kl": first_number(summary, ("max/kl", "last"), ("eval/kl", "max")),
            "status": summary.get("status") if isinstance(summary.get("status"), str) else None}


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
                             **summary_row(summary), "url": getattr(run, "url", None)})
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
    lines += ["From each run's W&B summary (final = last evaluation point, peak = highest win rate; a run of older "
              "code: its last and highest logged value). W&B state is the client's view, status the run's own.", "",
              "| run | state | status | job | task | loss | β | seed | step | final win rate | peak win rate | "
              "peak − final | final KL | max KL |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    for r in rows:
        lines.append(f"| {r['name']} | {r['state'] or '–'} | {r['status'] or '–'} | {r['job_type'] or '–'} | "
                     f"{r['task'] or '–'} | {r['loss'] or '–'} | {r['beta'] if r['beta'] is not None else '–'} | "
                     f"{r['seed'] if r['seed'] is not None else '–'} | {num(r['step'], '.0f')} | "
                     f"{num(r['win_rate'], '.3f')} | {num(r['peak_win_rate'], '.3f')} | {num(r['drop'], '.3f')} | "
                     f"{num(r['kl'], '.3g')} | {num(r['max_kl'], '.3g')} |")
    return "\n".join(lines + [""])


class NoTarget(ValueError):
    """The W&B group or project to log the report into is not known (the runs name none, or several)."""


@dataclass(frozen=True)
class Target:
    """Where the report is logged: a W&B project (None: ``isdpo.tracking``'s default), entity and group."""

    project: str | None
    entity: str | None
    group: str


def distinct(runs: Sequence[Run], key: str) -> list[str]:
    """The distinct values of a config key (resolved; ``result.json``'s where it has the key) over the runs."""
    values = {(r.result or {}).get(key) or (resolve(r.config, key) if r.config else None) for r in runs}
    return sorted(str(v) for v in values if v not in (None, "") and "${" not in str(v))


def report_target(runs: Sequence[Run], project: str | None = None, group: str | None = None) -> Target:
    """The W&B project and group of the report run: ``project`` (``ENTITY/PROJECT`` or ``PROJECT``) and ``group``
    where given, else those the runs logged into (``logger.project``, ``logger.entity`` and ``experiment``, the W&B
    group of every stage's run); raises :class:`NoTarget` when the runs do not name one."""
    entity = None
    if project:
        entity, _, project = project.rpartition("/")
        entity = entity or None
    else:
        projects, entities = distinct(runs, "logger.project"), distinct(runs, "logger.entity")
        if len(projects) > 1 or len(entities) > 1:
            raise NoTarget(f"the runs logged into several W&B projects ({', '.join(projects + entities)}): name "
                           "one with --wandb-project ENTITY/PROJECT")
        project, entity = (projects or [None])[0], (entities or [None])[0]
    if not group:
        groups = distinct(runs, "experiment")
        if len(groups) != 1:
            raise NoTarget(("the runs name no experiment" if not groups else
                            f"the runs belong to several experiments ({', '.join(groups)})") +
                           ": name the W&B group with --wandb-group GROUP")
        group = groups[0]
    return Target(project, entity, group)


def log_to_wandb(out: Path, figures: Sequence[Path], target: Target, config: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> str:
    """Log the report in ``out`` (``figures``: its PNGs, and its :data:`REPORT_TABLES`) as a W&B run of job_type
    ``report`` in ``target``'s group; returns the run's id (offline: under ``out/wandb``)."""
    tables = [out / name for name in REPORT_TABLES if (out / name).is_file() and (out / name).stat().st_size]
    where = {"project": target.project} if target.project else {}
    run_id = log_report(out, figures, tables, group=target.group, entity=target.entity, config=config, **where)
    project = (f"{target.entity}/" if target.entity else "") + (target.project or "(the default)")
    log(f"[report] W&B: logged as run {run_id} (job_type report) in group {target.group!r} of project {project}: "
        f"{len(figures)} figure(s), {len(tables)} table(s)")
    return run_id


