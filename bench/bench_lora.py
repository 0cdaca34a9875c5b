#!/usr/bin/env python
"""DPO with LoRA adapters (peft=lora) against full fine-tuning: pairs/s and peak memory, same model, same pairs,
same batches, in one process.

    python bench/bench_lora.py                         # SmolLM2-135M (scripts/get_smollm2.sh's GGUF), ~4 min CPU
    python bench/bench_lora.py --model tiny            # the tiny random Llama, seconds
    python bench/bench_lora.py --model smollm2 --scale 1 --batch 8 --steps 20   # full TL;DR lengths (GPU)

Both sides are isdpo's stage=align path as bench/bench_dpo.py runs it (PreferenceModule under the Lightning
Trainer, DPO, fp32, fused AdamW, lr 1e-6, clipping 1.0, the same pairs in the same order; see that file for
the data and the measurements: wall clock and main-thread CPU time over the steps after the warm-up, peak RSS
above the run's start, or torch.cuda.max_memory_allocated on GPU).

- full/*: the policy and a frozen reference are two copies of the model; every weight trains (AdamW keeps
  two more copies, and the gradients one more).
- lora/*: the policy is the reference's own weights with LoRA adapters (conf/peft/lora.yaml: r 16, alpha 32,
  all linear layers), the reference the same weights without them: one copy of the model, and only the
  adapters have gradients and optimizer state.
- */online: reference forward at every step; */precomputed: reference log-probs computed once before
  training (isdpo.ref_cache; its time is reported apart), so the full side frees its reference copy.

Results: a table on stdout and bench/results/bench_lora_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import (BETA, CLIP, LR, MODELS, RESULTS, Bench, RSSMonitor, StepTimer, sync, timed,  # noqa: E402
                       ensure_smollm2, release_memory, replace_spec)

import torch  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # conf/peft/lora.yaml


@dataclass(frozen=True)
class Config:
    name: str
    lora: bool
    ref: str  # online | precomputed


CONFIGS = [Config("full/online", False, "online"), Config("lora/online", True, "online"),
           Config("full/precomputed", False, "precomputed"), Config("lora/precomputed", True, "precomputed")]


def run(cfg: Config, bench: Bench) -> dict:
    from isdpo.losses import build_loss
    from isdpo.models import freeze, shared_copy
    from isdpo.recipe import pair_loader, preference_module, prepare_model
    from isdpo.ref_cache import add_reference_logps
    from isdpo.trainer import build_trainer

    B, S = bench.spec.batch, bench.spec
    out: dict = {}
    examples = bench.examples
    reference = freeze(bench.build_model())
    if cfg.ref == "precomputed":
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            examples, _, _ = add_reference_logps(list(examples), reference, pad_id=bench.pad_id, cache_dir=tmp,
                                                 batch_size=B)
        out["precompute_s"] = time.perf_counter() - t
    if cfg.lora:  # the policy on the reference's weights (stage=align with peft=lora)
        policy = prepare_model(shared_copy(reference), lora=LORA, seed=0)
    else:
        policy = bench.build_model()
    if cfg.ref == "precomputed":  # the module reads the batch's reference log-probs
        del reference
        reference = None
        release_memory()
    out["trainable_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    loader = pair_loader(examples, batch_size=B, seed=0, shuffle=False, pad_id=bench.pad_id)
    module = preference_module(policy, reference, build_loss("dpo", BETA), lr=LR, schedule="constant",
                               fused_adamw=True)
    hw = {"accelerator": "gpu" if torch.cuda.is_available() else "cpu", "devices": 1, "num_nodes": 1,
          "precision": "32-true", "strategy": "auto"}
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(hw, max_steps=S.warmup + S.steps, accumulate=1, run_dir=Path(tmp), logger=False,
                                callbacks=[timer], gradient_clip_val=CLIP, progress=False)
        trainer.fit(module, loader)
    out.update(timed(timer.marks, bench))
    out["mean_loss"] = statistics.fmean(timer.losses)
    del trainer, module, policy, reference, loader
    return out


def run_one(cfg: Config, bench: Bench) -> dict:
    release_memory()
    time.sleep(0.2)
    with RSSMonitor() as mon:
        res = run(cfg, bench)
        release_memory()
    res["peak_mem_mb"] = mon.peak_mb
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    ap.add_argument("--steps", type=int, help="timed steps per run (default per model)")
    ap.add_argument("--warmup", type=int, help="untimed first steps per run (default per model)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats of every configuration")
    ap.add_argument("--batch", type=int, help="pairs per step (default per model)")
    ap.add_argument("--scale", type=float, help="length scale of TL;DR-like prompts/responses")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    spec = MODELS[args.model]
    spec = replace(spec, **{k: v for k, v in {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                              "batch": args.batch}.items() if v is not None})
    if args.model == "smollm2" and not ensure_smollm2():
        sys.exit("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is absent: run scripts/get_smollm2.sh")
    bench = Bench(args.model, spec, args.scale if args.scale is not None else spec.scale, 0)
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    print(f"[bench] {args.model}: {bench.describe()}, batch {spec.batch}, {spec.steps} timed steps, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    t0 = time.time()
    run_one(configs[0], replace_spec(bench, replace(spec, steps=0, warmup=1)))  # lazy initialisation, not recorded
    for rep in range(spec.repeats):
        for c in (configs if rep % 2 == 0 else configs[::-1]):
            r = run_one(c, bench)
            runs[c.name].append(r)
            print(f"[bench] rep {rep} {c.name:18s} {r['pairs_per_s']:7.3f} pairs/s (cpu {r['cpu_pairs_per_s']:7.3f})"
                  f"  peak {r['peak_mem_mb']:8.1f} MB  trainable {r['trainable_params']:,}  "
                  f"mean loss {r['mean_loss']:.6f}", flush=True)
    summary = {name: {k: statistics.median([r[k] for r in rs]) for k in
                      ("pairs_per_s", "cpu_pairs_per_s", "peak_mem_mb", "mean_loss", "trainable_params")}
               for name, rs in runs.items()}
    print(f"\n{'config':18s} {'pairs/s':>8s} {'cpu pairs/s':>11s} {'peak MB':>8s} {'trainable':>12s} "
          f"{'mean loss':>10s}")
    for name, s in summary.items():
        print(f"{name:18s} {s['pairs_per_s']:8.3f} {s['cpu_pairs_per_s']:11.3f} {s['peak_mem_mb']:8.1f} "
              f"{s['trainable_params']:12,.0f} {s['mean_loss']:10.6f}")
    ratios = {}
    for ref in ("online", "precomputed"):
        a, b = summary.get(f"lora/{ref}"), summary.get(f"full/{ref}")
        if a and b:
            ratios[ref] = {"pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
                           "cpu_pairs_per_s": a["cpu_pairs_per_s"] / b["cpu_pairs_per_s"],
                           "peak_mem": a["peak_mem_mb"] / b["peak_mem_mb"]}
            print(f"lora/{ref} / full/{ref}: pairs/s {ratios[ref]['pairs_per_s']:.2f}x "
                  f"(cpu {ratios[ref]['cpu_pairs_per_s']:.2f}x), peak memory {ratios[ref]['peak_mem']:.2f}x")
    path = RESULTS / f"bench_lora_{args.model}.json"
    path.write_text(json.dumps({"model": args.model, "spec": asdict(spec), "data": bench.describe(), "lora": LORA,
                                "summary": summary, "ratios": ratios, "runs": runs, "wall_s": time.time() - t0,
                                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                "load_avg": os.getloadavg()}, indent=1))
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
