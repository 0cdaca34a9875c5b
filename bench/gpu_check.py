#!/usr/bin/env python
"""bench/gpu_check.sh's helper: the pipeline runs and the one JSON summary.

    python bench/gpu_check.py env --out env.json
    python bench/gpu_check.py pipelines --work DIR --out pipelines.json [--cpu-dry-run] [--deadline-s N]
    python bench/gpu_check.py summary --work DIR --out gpu_check.json

``pipelines``: ``python launch.py stage=pipeline`` four times, each in its own process: the synthetic task and
the text task (TL;DR schema on the local stand-ins of tests/fixtures_text.py) with ``hardware=gpu1`` (one GPU,
bf16-mixed) and with FSDP on that one device (``hardware.strategy=fsdp``, activation checkpointing). Each run's
status, seconds, final evaluation point and last ``perf/*`` row (tokens/s, MFU) are recorded.
``--cpu-dry-run``: the same runs on the CPU with small sizes (``accelerator=cpu``, a nominal peak for MFU).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The synthetic task at a size that shows throughput on a GPU in ~30 s (the default job has 500 steps and an
# evaluation every 20; the curve is not the point here).
SYNTHETIC = ["task.train.max_steps=200", "task.eval.every_n_steps=50", "hardware.per_device_batch_size=64"]
SYNTHETIC_DRY = ["task.n_sft_sequences=512", "task.sft.epochs=1", "task.n_pref_prompts=256",
                 "task.train.max_steps=12", "task.eval.every_n_steps=6", "task.eval.n_prompts=32",
                 "task.train.global_batch_size=32", "hardware.per_device_batch_size=16"]
FSDP = ["hardware.strategy=fsdp", "hardware.activation_checkpointing=true"]


def hardware(dry: bool) -> list[str]:
    hw = ["hardware=gpu1", "hardware.sft_per_device_batch_size=null"]
    if dry:
        hw += ["hardware.accelerator=cpu", "hardware.num_workers=0", "hardware.torch_threads=1",
               "hardware.peak_flops=1.0e12"]
    return hw


def last_perf(out: Path) -> dict | None:
    path = out / "csv" / "align" / "metrics.csv"
    if not path.exists():
        return None
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("perf/tokens_per_s")]
    return {k: float(v) for k, v in rows[-1].items() if v and k.startswith("perf/")} if rows else None


def launch(name: str, overrides: list[str], work: Path, timeout: float) -> dict:
    out = work / name
    env = {**os.environ, "ISDPO_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), "stage=pipeline", "logger=csv", *overrides,
           f"hydra.run.dir={out}"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        partial = err.stdout or ""
        rc, log = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    row = {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1), "overrides": overrides}
    if rc == 0:
        result = json.loads((out / "result.json").read_text())
        final = result.get("final") or {}
        row["final"] = {k: final.get(k) for k in ("step", "win_rate", "kl", "loss", "rewards/accuracies")}
        evaluation = out / "evaluation.json"
        if evaluation.exists():
            row["evaluation_win_rate"] = json.loads(evaluation.read_text()).get("win_rate")
        row["perf"] = last_perf(out)
    else:
        row["log_tail"] = log[-3000:]
    print(f"[gpu_check] {name}: rc={rc} in {row['seconds']} s {row.get('final', '')} perf={row.get('perf')}",
          flush=True)
    return row


def pipelines(work: Path, dry: bool, deadline_s: float) -> dict:
    from tests.fixtures_text import build_standins, text_overrides

    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    paths = build_standins(work / "standins", n_train=48, n_eval=16)
    synthetic = hardware(dry) + (SYNTHETIC_DRY if dry else SYNTHETIC)
    text = text_overrides(paths, "tldr") + hardware(dry) + ["hardware.per_device_batch_size=4"]
    runs = [("synthetic-gpu1", synthetic), ("synthetic-fsdp", synthetic + FSDP), ("text-gpu1", text),
            ("text-fsdp", text + FSDP)]
    rows = []
    for i, (name, overrides) in enumerate(runs):
        left = deadline_s - (time.time() - start)
        if left < 10:
            rows.append({"name": name, "rc": "skipped: out of time"})
            continue
        rows.append(launch(name, overrides, work, left / (len(runs) - i) * 1.5))  # a slow run may borrow time
    return {"runs": rows, "seconds": round(time.time() - start, 1), "dry_run": dry}


def env_report() -> dict:
    import torch

    out = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("lightning", "transformers", "trl", "datasets", "hydra", "omegaconf", "peft", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - report what is missing, do not stop
            out[name] = f"missing: {type(err).__name__}: {err}"
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["nvidia_smi"] = None
    return out


def bench_digest(path: Path) -> dict | None:
    """The figures of one bench/bench_dpo.py JSON: per configuration tokens/s, peak memory, MFU, loss; ratios."""
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    keep = ("pairs_per_s", "tokens_per_s", "peak_mem_mb", "mfu", "mean_loss", "precompute_s", "step_s_median")
    return {"model": res["model"], "arch": res.get("arch"), "n_matmul_params": res.get("n_matmul_params"),
            "peak_flops": res.get("peak_flops"), "spec": res["spec"], "data": res["data"],
            "summary": {k: {m: v.get(m) for m in keep} for k, v in res["summary"].items()},
            "ratios": [{k: r.get(k) for k in ("isdpo", "trl", "what", "tokens_per_s_ratio", "peak_mem_ratio")}
                       for r in res["ratios"]], "wall_s": res.get("wall_s")}


def summary(work: Path) -> dict:
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()] \
        if (work / "steps.jsonl").exists() else []
    read = lambda name: json.loads((work / name).read_text()) if (work / name).exists() else None  # noqa: E731
    return {"env": read("env.json"), "steps": steps, "pipelines": read("pipelines.json"),
            "bench": {m: bench_digest(work / f"bench_{m}.json") for m in ("smollm2-arch", "llama-1b")},
            "ok": bool(steps) and all(s.get("rc") == 0 for s in steps)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["env", "pipelines", "summary"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/isdpo-gpu-check"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=150.0, help="pipelines: time for all four runs")
    args = ap.parse_args(argv)
    if args.what == "env":
        res = env_report()
    elif args.what == "pipelines":
        res = pipelines(args.work, args.cpu_dry_run, args.deadline_s)
    else:
        res = summary(args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"[gpu_check] wrote {args.out}")
    if args.what == "pipelines" and any(r.get("rc") != 0 for r in res["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
