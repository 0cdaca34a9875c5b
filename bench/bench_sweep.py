#!/usr/bin/env python
"""A sweep's cost, before and after: the synthetic_small grid (sweeps/synthetic_small.yaml, 12 runs) with the
code of a baseline commit and with the current code, on this machine, in one invocation.

    python bench/bench_sweep.py                         # baseline 15267d7 (basic launcher) vs current (joblib, 2 jobs)
    python bench/bench_sweep.py --jobs 4 --baseline HEAD~3
    python bench/bench_sweep.py --quick                 # 20-step runs: checks the bench itself (~3 min)

Each side runs the grid as its users do, from an empty cache (the SFT reference and the preference sets are
built inside the grid, as the first time a user runs it), with its own launch.py:
- baseline: `python launch.py -m +sweep=synthetic_small` (Hydra's basic launcher: the jobs one after the
  other in one process), from `git archive <commit>` unpacked in a temporary folder (no git state changes);
  the venv is the same for both sides;
- current: the same command plus `hydra/launcher=joblib hydra.launcher.n_jobs=<jobs>`.

Measured: wall clock of the command; CPU seconds = user + system time of the command and everything it waited
for (its workers and W&B's process included: resource.getrusage(RUSAGE_CHILDREN) around it), per run = / 12.
The split start-up / SFT / preference sets / training / evaluation / other is the sum over the runs of
- current: each run's result.json ``timing`` block (isdpo/timing.py: CPU seconds per phase, measured in the run);
- baseline: the same phases measured by this script's ``--probe`` mode, which runs the baseline's launch.py
  with timers wrapped around its stage functions, Trainer.fit, the evaluator and the preference set (the
  phases are charged exclusively, as isdpo/timing.py does; the wrappers cost microseconds per call).
Both sides' per-seed final and peak win rate and KL are printed side by side, with the largest difference
against the seed-to-seed spread (the current code leaves the last position out of the training forward and takes the
KL's policy log-probs from the sampling pass: float rounding differs, ~1e-6), and the projected time of the paper's comparison on this testbed: 7 methods x 3 betas x 5 seeds
= 105 runs, at each side's measured wall clock per run. Writes bench/results/bench_sweep.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("startup", "sft", "preferences", "train", "evaluation", "other")


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_side(name: str, cmd: list[str], cwd: Path, env: dict) -> dict:
    """Runs one side's grid; wall clock and CPU seconds of everything it ran."""
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    load = os.getloadavg()[0]
    c0, t0 = cpu_children(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    (Path(env["BENCH_LOG_DIR"]) / f"{name}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"[bench] {name} failed (exit {proc.returncode}); its output: {env['BENCH_LOG_DIR']}/{name}.log\n"
                 + proc.stdout[-3000:])
    print(f"[bench] {name}: {wall:.0f} s wall, {cpu:.0f} CPU-s (load average before: {load:.2f})", flush=True)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": os.getloadavg()[0]}


def results_of(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]


def split(timings: list[dict]) -> dict:
    """CPU seconds per phase, summed over the runs."""
    out = {k: 0.0 for k in PHASES}
    for t in timings:
        for k, v in t.items():
            if k != "total":
                out[k if k in out else "other"] += v["cpu_s"]
    return out


def curve_points(results: list[dict]) -> dict:
    return {f"{r['loss']} b={r['beta']} s={r['seed']}": {
        "final_win_rate": r["final"]["win_rate"], "peak_win_rate": r["peak"]["win_rate"],
        "peak_step": r["peak"]["step"], "final_kl": r["final"]["kl"]} for r in results}


def differences(base: dict, cur: dict) -> dict:
    """Per metric: (largest |current - baseline| over the runs both sides have, the baseline's seed standard
    deviation averaged over its configurations)."""
    out = {}
    for metric in ("final_win_rate", "peak_win_rate", "final_kl"):
        keys = [k for k in cur if k in base]
        diff = max((abs(cur[k][metric] - base[k][metric]) for k in keys), default=float("nan"))
        groups: dict[str, list[float]] = {}
        for k in keys:
            groups.setdefault(k.rsplit(" s=", 1)[0], []).append(base[k][metric])
        spreads = [statistics.stdev(v) for v in groups.values() if len(v) > 1]
        out[metric] = (diff, statistics.fmean(spreads) if spreads else float("nan"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="15267d7", help="commit of the baseline code")
    ap.add_argument("--jobs", type=int, default=2, help="hydra.launcher.n_jobs of the current side")
    ap.add_argument("--sweep", default="synthetic_small")
    ap.add_argument("--quick", action="store_true", help="20-step runs (checks the bench, measures nothing)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (caches, run folders)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_sweep.json"))
    args = ap.parse_args()

    extra = ["task.train.max_steps=20", "task.eval.every_n_steps=10"] if args.quick else []
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    env = {**os.environ, "BENCH_LOG_DIR": str(tmp), "HYDRA_FULL_ERROR": "1"}
    env.pop("ISDPO_CACHE_DIR", None)
    sides, split_cpu, points = {}, {}, {}
    try:
        if not args.skip_baseline:
            base = tmp / "baseline_code"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            probe_out = tmp / "baseline_phases.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(base / "launch.py"), str(probe_out),
                   "-m", f"+sweep={args.sweep}", f"hydra.sweep.dir={tmp / 'baseline_runs'}", *extra]
            sides["baseline"] = run_side("baseline", cmd, base, {**env, "ISDPO_CACHE_DIR": str(tmp / "baseline_cache")})
            split_cpu["baseline"] = split(json.loads(probe_out.read_text()))
            points["baseline"] = curve_points(results_of(tmp / "baseline_runs"))
        cmd = [sys.executable, str(ROOT / "launch.py"), "-m", f"+sweep={args.sweep}", "hydra/launcher=joblib",
               f"hydra.launcher.n_jobs={args.jobs}", f"hydra.sweep.dir={tmp / 'current_runs'}", *extra]
        sides["current"] = run_side("current", cmd, ROOT, {**env, "ISDPO_CACHE_DIR": str(tmp / "current_cache")})
        current = results_of(tmp / "current_runs")
        split_cpu["current"] = split([r["timing"] for r in current])
        points["current"] = curve_points(current)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"[bench] kept {tmp}")

    n = len(points["current"])
    report = {"sweep": args.sweep, "runs": n, "baseline_commit": args.baseline, "jobs": args.jobs,
              "quick": args.quick, "cores": os.cpu_count(), "sides": sides, "split_cpu_s": split_cpu,
              "points": points}
    for name, s in sides.items():
        s["cpu_s_per_run"] = s["cpu_s"] / n
        s["wall_s_per_run"] = s["wall_s"] / n
        s["projected_105_runs_min"] = s["wall_s"] / n * 105 / 60
    print(f"\n{args.sweep}: {n} runs; baseline {args.baseline} (basic launcher) vs current (joblib, {args.jobs} jobs)")
    print(f"{'':24}" + "".join(f"{k:>14}" for k in sides) + ("         ratio" if len(sides) == 2 else ""))
    rows = [("wall clock (s)", "wall_s"), ("CPU-s (all runs)", "cpu_s"), ("CPU-s per run", "cpu_s_per_run"),
            ("105 runs (min)", "projected_105_runs_min")]
    for label, key in rows:
        vals = [sides[k][key] for k in sides]
        ratio = f"{vals[0] / vals[1]:13.2f}x" if len(vals) == 2 else ""
        print(f"{label:24}" + "".join(f"{v:14.1f}" for v in vals) + ratio)
    print("CPU-s per run by phase:")
    for ph in PHASES:
        vals = [split_cpu[k][ph] / n for k in sides]
        print(f"  {ph:22}" + "".join(f"{v:14.2f}" for v in vals))
    # the launching process itself (Hydra's sweep; the joblib launcher's parent) and W&B's process
    print(f"  {'(outside the runs)':22}"
          + "".join(f"{(sides[k]['cpu_s'] - sum(split_cpu[k].values())) / n:14.2f}" for k in sides))
    if len(points) == 2:
        print(f"\n{'run':22} {'final win':>17} {'peak win (step)':>27} {'final KL':>17}")
        same = 0
        for key in sorted(points["current"]):
            a, b = points["baseline"].get(key), points["current"][key]
            if a is None:
                continue
            same += a == b
            print(f"{key:22} {a['final_win_rate']:8.3f} {b['final_win_rate']:8.3f} "
                  f"{a['peak_win_rate']:8.3f} ({a['peak_step']:3d}) {b['peak_win_rate']:8.3f} ({b['peak_step']:3d}) "
                  f"{a['final_kl']:8.3f} {b['final_kl']:8.3f}")
        print(f"{same} of {n} runs give bit-identical final and peak points on both sides (baseline | current)")
        report["identical_runs"] = same
        report["max_abs_difference"] = differences(points["baseline"], points["current"])
        print("largest |current - baseline| over the runs, against the spread of the baseline's seeds (the scale a "
              "difference would have to reach to matter):")
        for metric, (diff, spread) in report["max_abs_difference"].items():
            print(f"  {metric:16} {diff:10.2e}   seed std (mean over configurations) {spread:8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[bench] {args.out}")


def probe(launch: str, out: str, argv: list[str]) -> None:
    """Run the baseline's launch.py with phase timers around its stages (see the module docstring)."""
    base = Path(launch).resolve().parent
    sys.path.insert(0, str(base))  # the baseline's isdpo, not the current one
    spec = importlib.util.spec_from_file_location("bench_timing", ROOT / "isdpo" / "timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    timer, runs = timing.RunTimer(), []

    import lightning.pytorch as pl

    import isdpo.stages as stages
    from isdpo.data.synthetic_runtime import SyntheticRuntime
    from isdpo.evaluate import Evaluator

    def timed(fn, name, unless=()):
        def wrapper(*a, **k):
            if timer.current() in unless:  # e.g. the SFT's own Trainer.fit counts as "sft"
                return fn(*a, **k)
            with timer.phase(name):
                return fn(*a, **k)
        return wrapper

    def run_stage(cfg, *a, **k):
        timer.start_run()
        result = real_run_stage(cfg, *a, **k)
        runs.append(timer.end_run())
        return result

    real_run_stage = stages.run_stage
    stages.run_stage = run_stage
    stages.run_sft = timed(stages.run_sft, "sft")
    stages.run_evaluate = timed(stages.run_evaluate, "evaluation")
    pl.Trainer.fit = timed(pl.Trainer.fit, "train", unless=("sft",))
    SyntheticRuntime.preference_examples = timed(SyntheticRuntime.preference_examples, "preferences")
    SyntheticRuntime.evaluator = timed(SyntheticRuntime.evaluator, "evaluation")
    Evaluator.__call__ = timed(Evaluator.__call__, "evaluation")
    sys.argv = [launch, *argv]
    try:
        runpy.run_path(launch, run_name="__main__")
    finally:
        Path(out).write_text(json.dumps(runs))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
