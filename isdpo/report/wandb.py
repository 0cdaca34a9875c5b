"""The report's optional W&B section: run summaries of a W&B project, fetched with a deadline."""
from __future__ import annotations

import threading
from typing import Any

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


