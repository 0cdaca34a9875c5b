"""Report of a sweep: tables (Markdown, CSV), over-optimization figures (PNG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--wandb-project ENTITY/PROJECT] [--no-seeds]

A run is any folder under the sweep directory holding ``result.json``,
``metrics.jsonl`` or ``.hydra/config.yaml`` (what ``isdpo.stages`` and Hydra
write). Its loss, beta, seed and task come from ``result.json`` or else from
``.hydra/config.yaml`` (then ``.hydra/overrides.yaml``).

Only completed runs (``result.json`` with status "completed" and a non-empty
``metrics.jsonl``) enter tables and figures; every other run is listed in
``report.md`` with the reason (no result.json, status != completed, empty
metrics, unreadable files, duplicate of another run).

Writes into ``--out`` (default ``<sweep dir>/report``): ``report.md``,
``summary.csv`` (one row per task x loss x beta), ``runs.csv`` (one row per run,
failed ones included) and per task ``overopt_<task>.png``,
``win_rate_vs_step_<task>.png``, ``kl_vs_step_<task>.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULT, METRICS, HYDRA_CONFIG, HYDRA_OVERRIDES = "result.json", "metrics.jsonl", ".hydra/config.yaml", \
    ".hydra/overrides.yaml"


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

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def key(self) -> tuple:
        return self.task, self.loss, self.beta, self.seed


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
    skipped (and counted) instead of failing the whole report.
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
        if isinstance(row, dict) and "step" in row and "win_rate" in row and "kl" in row:
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


def _identity_from_hydra(folder: Path) -> dict:
    """task, loss, beta, seed from .hydra/config.yaml, filled in from .hydra/overrides.yaml."""
    import yaml

    ident: dict[str, Any] = {}
    try:
        cfg = yaml.safe_load((folder / HYDRA_CONFIG).read_text()) or {}
        # Interpolations such as ${...} stay strings here; _to_float / _to_int turn them into None.
        ident = {"task": (cfg.get("task") or {}).get("name"), "loss": (cfg.get("loss") or {}).get("name"),
                 "beta": cfg.get("beta"), "seed": cfg.get("seed")}
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    try:
        for item in yaml.safe_load((folder / HYDRA_OVERRIDES).read_text()) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            current = ident.get(key)
            if key in ("task", "loss", "beta", "seed") and (current in (None, "") or "${" in str(current)):
                ident[key] = value
    except (OSError, yaml.YAMLError, TypeError):
        pass
    return ident


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

    ident = _identity_from_hydra(folder)
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
    """All runs under ``root``; of two completed runs with the same task/loss/beta/seed the newer is kept."""
    root = Path(root)
    runs = [load_run(folder, root) for folder in discover(root, exclude)]
    newest: dict[tuple, Run] = {}
    for run in sorted((r for r in runs if r.ok), key=lambda r: (r.path / RESULT).stat().st_mtime):
        if run.key in newest:
            older = newest[run.key]
            older.status, older.reason = "duplicate", f"same task/loss/beta/seed as {run.name} (newer, kept)"
        newest[run.key] = run
    return runs


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------

def _judge(result: dict) -> float | None:
    judge = result.get("judge")
    return _to_float(judge.get("win_rate")) if isinstance(judge, dict) else None


#: Per-run quantities of the summary: column -> (header, number format, value from result.json).
RUN_QUANTITIES: dict[str, tuple[str, str, Callable[[dict], float | None]]] = {
    "final_win_rate": ("final win rate", ".3f", lambda r: float(r["final"]["win_rate"])),
    "peak_win_rate": ("peak win rate", ".3f", lambda r: float(r["peak"]["win_rate"])),
    "peak_step": ("step of peak", ".0f", lambda r: float(r["peak"]["step"])),
    "final_kl": ("final KL", ".3g", lambda r: float(r["final"]["kl"])),
    "drop": ("peak − final win rate", ".3f",
             lambda r: float(r["peak"]["win_rate"]) - float(r["final"]["win_rate"])),
    "judge_win_rate": ("judge win rate", ".3f", _judge),
}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n - 1), n); std is NaN for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def summarise(runs: list[Run]) -> list[dict]:
    """One row per (task, loss, beta) of the completed runs: seeds and mean/std/n of each ``RUN_QUANTITIES``."""
    from isdpo.report_plots import loss_order

    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault((run.task or "", run.loss, run.beta), []).append(run)
    order = loss_order([k[1] for k in groups])
    rows = []
    for (task, loss, beta) in sorted(groups, key=lambda k: (k[0], k[2], order.index(k[1]))):
        group = sorted(groups[(task, loss, beta)], key=lambda r: (r.seed is None, r.seed))
        row: dict[str, Any] = {"task": task, "loss": loss, "beta": beta, "n_seeds": len(group),
                               "seeds": " ".join(str(r.seed) for r in group)}
        for col, (_, _, get) in RUN_QUANTITIES.items():
            values = [v for v in (get(r.result) for r in group) if v is not None]
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = mean_std(values)
        rows.append(row)
    return rows


def _cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if not math.isnan(std) else "")


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of ``summarise`` rows of one task: mean ± std per quantity.

    The best final win rate at each beta is in bold.
    The judge column appears only when some run has a judge win rate; its cell
    names its own n when fewer seeds were judged than trained.
    """
    cols = [c for c in RUN_QUANTITIES if c != "judge_win_rate" or any(r["judge_win_rate_n"] for r in rows)]
    header = ["loss", "β"] + [RUN_QUANTITIES[c][0] for c in cols] + ["n seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) + 1)) + "|"]
    best = {}
    for r in rows:
        if not math.isnan(r["final_win_rate_mean"]):
            best[r["beta"]] = max(best.get(r["beta"], -math.inf), r["final_win_rate_mean"])
    for r in rows:
        cells = [f"`{r['loss']}`", f"{r['beta']:g}"]
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
    """One CSV row per run (failed ones included): identity, status, reason and the per-run quantities."""
    rows = []
    for run in runs:
        row = {"folder": run.name, "task": run.task, "loss": run.loss, "beta": run.beta, "seed": run.seed,
               "status": run.status, "reason": run.reason, "n_eval_points": len(run.metrics)}
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
    from isdpo.report_plots import FIGURES, loss_colours, save_figure

    done = [r for r in runs if r.ok]
    colours = loss_colours([r.loss for r in done])  # one mapping for all tasks and figures
    pngs: dict[str, list[tuple[Path, str]]] = {}
    for task in sorted({r.task or "" for r in done}):
        task_runs = [r for r in done if (r.task or "") == task]
        for stem, (plot, caption) in FIGURES.items():
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
    for task in sorted({row["task"] for row in summary}):
        md += [f"## Task `{task or '?'}`", "",
               "Mean ± sample standard deviation over seeds, from each run's `result.json` "
               "(final = last evaluation point, peak = evaluation point of highest golden win rate). "
               "Peak − final win rate is the over-optimization indicator: large means the policy got worse "
               "after its best point. Bold: best final win rate at that β.", "",
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

    md += ["## Files", "", "- `summary.csv`: the tables above, one row per task × loss × β (mean, std, n)",
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
