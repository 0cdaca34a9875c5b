"""Report of a sweep: tables (Markdown, CSV), statistics with Student-t intervals, paired claims with Holm's
correction, figures (PNG and SVG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--instance-key KEY] [--wandb-project ENTITY/PROJECT] [--seeds]
                           [--wandb [--wandb-group GROUP]]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isdpo.report.build import NoRuns, NotLogged, build_report
from isdpo.report.runs import INSTANCE_KEY
from isdpo.report.wandb import NoTarget

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isdpo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="sweep directory (e.g. multirun/overopt) or a single run folder")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/report)")
    parser.add_argument("--wandb-project", default=None, metavar="ENTITY/PROJECT",
                        help="also list the run summaries of this W&B project (needs network and a key); with "
                             "--wandb, the project the report is logged into")
    parser.add_argument("--wandb", action="store_true",
                        help="log the report (PNG figures, CSV tables) as a W&B run of job_type report into the "
                             "sweep's W&B group (offline without a key, or with WANDB_MODE=offline)")
    parser.add_argument("--wandb-group", default=None, metavar="GROUP",
                        help="W&B group of the report run (default: the runs' experiment, their W&B group)")
    parser.add_argument("--seeds", action="store_true",
                        help="also draw each seed as a thin line in the against-step figures")
    parser.add_argument("--no-seeds", action="store_true",
                        help="draw only the means and bands (the default; kept for old command lines)")
    parser.add_argument("--instance-key", default=INSTANCE_KEY, metavar="KEY",
                        help=f"config key naming the task instance (default {INSTANCE_KEY}; statistics are per "
                             "instance and pooled over instances; a sweep without the key has one instance)")
    parser.add_argument("--no-figures", action="store_true", help="tables and run list only (fast)")
    args = parser.parse_args(argv)
    if args.wandb_group and not args.wandb:
        parser.error("--wandb-group names the group of the report's W&B run: add --wandb")
    if not args.sweep.is_dir():
        print(f"[report] not a directory: {args.sweep}", file=sys.stderr)
        return 2
    try:
        report = build_report(args.sweep, args.out, args.wandb_project, show_seeds=args.seeds and not args.no_seeds,
                              figures=not args.no_figures, instance_key=args.instance_key, log_wandb=args.wandb,
                              wandb_group=args.wandb_group)
    except (NoRuns, NoTarget) as err:
        print(f"[report] {err}", file=sys.stderr)
        return 2
    except NotLogged as err:
        print(f"[report] wrote {err.report}, but could not log it to W&B: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only sweep folder, a full disk: say where, not a traceback
        out = args.out or args.sweep / "report"
        print(f"[report] cannot write the report into {out}: {err.strerror or err} ({err.filename or out}); write "
              "it elsewhere with --out DIR", file=sys.stderr)
        return 1
    print(f"[report] wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
