#!/usr/bin/env python
"""Where a training step's time goes, isdpo vs TRL: torch.profiler op tables and a pyinstrument call tree.

    python bench/profile_dpo.py --model tiny --configs trl/online isdpo/online isdpo/fast
    python bench/profile_dpo.py --model smollm2 --steps 2 --configs trl/online isdpo/online

Runs each configuration of bench/bench_dpo.py (same data, batches, settings) with the training
call wrapped in torch.profiler (CPU ops, self time) and, if installed, pyinstrument (Python call
tree: framework overhead). Writes bench/results/profile_<model>_<config>.{ops.txt,tree.txt} and
prints a summary: share of time in attention, matmuls, the LM head / log-softmax, optimizer,
and everything else.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo as bd  # noqa: E402
import torch  # noqa: E402

GROUPS = {
    "attention (sdpa)": ("scaled_dot_product", "flash_attention"),
    "matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "log-softmax / logsumexp / gather": ("logsumexp", "log_softmax", "_log_softmax", "gather", "exp"),
    "optimizer (AdamW)": ("_fused_adamw", "adam", "_foreach", "addcdiv", "lerp"),
}


def summarise(prof) -> dict[str, float]:
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    out = {k: 0.0 for k in GROUPS}
    for e in ev:
        for g, keys in GROUPS.items():
            if any(k in e.key for k in keys):
                out[g] += e.self_cpu_time_total
                break
    out["other ops"] = total - sum(out.values())
    return {k: v / total for k, v in out.items()} | {"total_op_s": total / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--configs", nargs="+", default=["trl/online", "isdpo/online", "isdpo/fast"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=float)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = {s.name: s for s in bd.MAIN + bd.ABLATIONS + bd.EXTRAS + bd.COMPILE}
    spec = replace(bd.MODELS[args.model], steps=args.steps, warmup=1)
    if args.model == "smollm2" and not bd.ensure_smollm2():
        print("smollm2 absent: run scripts/get_smollm2.sh")
        return
    bench = bd.Bench(args.model, spec, args.scale if args.scale is not None else spec.scale, 0)
    bd.RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    for name in args.configs:
        s = specs[name]
        holder = {}

        @contextlib.contextmanager
        def wrap():
            from torch.profiler import ProfilerActivity, profile

            pyi = Profiler(interval=0.002) if Profiler else None
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                if pyi:
                    pyi.start()
                try:
                    yield
                finally:
                    if pyi:
                        pyi.stop()
            holder["prof"], holder["pyi"] = prof, pyi

        run = bd.run_isdpo if s.side == "isdpo" else bd.run_trl
        res = run(s, bench, wrap=wrap)
        stem = bd.RESULTS / f"profile_{args.model}_{name.replace('/', '_')}"
        prof = holder["prof"]
        Path(f"{stem}.ops.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\nby input shape:\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40,
                                                                 max_name_column_width=40, max_shapes_column_width=80))
        if holder["pyi"]:
            Path(f"{stem}.tree.txt").write_text(holder["pyi"].output_text(
                unicode=False, color=False, show_all=True, processor_options={"filter_threshold": 0.01}))
        shares = summarise(prof)
        print(f"\n{name}: {res['pairs_per_s']:.3f} pairs/s, step {res['step_s_median']:.3f}s; "
              f"op time {shares.pop('total_op_s'):.2f}s over {spec.warmup + spec.steps} steps")
        for k, v in shares.items():
            print(f"   {k:36s} {100 * v:5.1f}%")
        print(f"   -> {stem}.ops.txt" + (f", {stem}.tree.txt" if holder["pyi"] else ""))


if __name__ == "__main__":
    main()
