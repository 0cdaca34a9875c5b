"""Report of a sweep: tables (Markdown, CSV), statistics with Student-t intervals, paired claims with Holm's
correction, figures (PNG and SVG) and a list of failed runs.

    python -m isdpo.report <sweep dir> [--out DIR] [--instance-key KEY] [--wandb-project ENTITY/PROJECT] [--seeds]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isdpo.report.build import NoRuns, build_report
from isdpo.report.runs import INSTANCE_KEY

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
    except NoRuns as err:
        print(f"[report] {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only sweep folder, a full disk: say where, not a traceback
        out = args.out or args.sweep / "report"
        print(f"[report] cannot write the report into {out}: {err.strerror or err} ({err.filename or out}); write "
              "it elsewhere with --out DIR", file=sys.stderr)
        return 1
    print(f"[report] wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
