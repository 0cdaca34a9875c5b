"""stage=align: preference training with the configured loss, evaluated along the way (the
over-optimization curve); writes metrics.jsonl, policy/, result.json and checkpoints/last.ckpt."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from isdpo.artifacts import CHECKPOINT, METRICS, POLICY, RESULT
from isdpo.callbacks import EvalCallback, read_jsonl
from isdpo.distributed import rank_world
from isdpo.flops import PerfMonitor
from isdpo.losses import build_loss
from isdpo.models import load_causal_lm
from isdpo.recipe import pair_loader, preference_module, prepare_model
from isdpo.run_guard import check_checkpoint, check_identity, fit
from isdpo.stages.common import load_reference, plain, run_dir, save_model, stage_logger, task_of
from isdpo.stages.sft import run_sft
from isdpo.trainer import accumulation, build_trainer, finish_logger


def resume_point(cfg, out: Path, fast_dev_run: bool) -> str | None:
    """The checkpoint to resume from (checked readable and from a run with the same config), or None."""
    ckpt = out / CHECKPOINT
    resume = str(ckpt) if cfg.task.train.resume and ckpt.exists() and not fast_dev_run else None
    if rank_world()[0] != 0 or fast_dev_run:
        return resume
    if resume:
        check_checkpoint(ckpt)
    check_identity(out, plain(cfg), resuming=resume is not None, replace=not cfg.task.train.resume)
    if not resume:  # a fresh start: an earlier run's result must not outlive it
        (out / RESULT).unlink(missing_ok=True)
    return resume


def run_align(cfg, ref_dir: Path | None = None, fast_dev_run: bool = False) -> dict:
    """Preference training with the configured loss; returns result.json's content ({} on ranks > 0)."""
    out = run_dir(cfg)
    resume = resume_point(cfg, out, fast_dev_run)  # before anything expensive: a mismatch stops here
    ref_dir = ref_dir or run_sft(cfg, fast_dev_run=fast_dev_run)
    task = task_of(cfg)
    reference = load_reference(cfg, task, ref_dir)
    loss_fn = build_loss(cfg.loss.base, cfg.beta, plain(cfg.loss.params), plain(cfg.loss.importance_sampling))
    pairs = task.preference_examples(reference, ref_dir)
    evaluator = task.evaluator(reference, cfg.task.eval)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    hw, tr = cfg.hardware, cfg.task.train
    # The policy starts as a copy of the reference (both from the SFT checkpoint).
    policy = prepare_model(load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=str(ref_dir / "model")),
                           activation_checkpointing=hw.activation_checkpointing, strategy=hw.strategy,
                           compile=tr.compile)
    acc = accumulation(tr.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
    loader = pair_loader(pairs, batch_size=hw.per_device_batch_size, seed=cfg.seed, pad_id=task.pad_id,
                         num_workers=hw.num_workers, length_grouped=tr.length_grouped,
                         group_batches=tr.group_batches, packing=tr.packing, share_prompt=tr.share_prompt)
    module = preference_module(policy, reference, loss_fn, lr=tr.lr, weight_decay=tr.weight_decay,
                               warmup_steps=tr.warmup_steps, schedule=tr.schedule,
                               response_only=tr.response_only_logits, concatenated=tr.concatenated_forward,
                               fused_adamw=tr.fused_adamw, strategy=hw.strategy)
    # The throughput monitor must come before the evaluation, which it must not time.
    callbacks = [PerfMonitor(peak_flops=hw.get("peak_flops", "auto")),
                 EvalCallback(evaluator, out / METRICS, cfg.task.eval.every_n_steps)]
    logger = stage_logger(cfg, "align")
    try:
        trainer = build_trainer(hw, max_steps=tr.max_steps, accumulate=acc, run_dir=out, logger=logger,
                                callbacks=callbacks, gradient_clip_val=tr.gradient_clip_val,
                                checkpoint_every_n_steps=0 if fast_dev_run else tr.checkpoint_every_n_steps,
                                fast_dev_run=fast_dev_run, model=policy)
        if resume:
            print(f"[isdpo] resuming from {resume}")
        started = time.time()
        fit(trainer, module, loader, ckpt_path=resume)
        if tr.checkpoint_every_n_steps > 0 and not fast_dev_run:
            # The final state too, so rerunning a finished job resumes at its end instead of retraining.
            trainer.save_checkpoint(out / CHECKPOINT)
        if not trainer.is_global_zero:  # other data-parallel ranks stop here; rank zero writes
            return {}
        save_model(policy, task, out / POLICY)
        result = write_result(cfg, out, time.time() - started, ref_dir)
    finally:
        finish_logger(logger)
    return result


def write_result(cfg, out: Path, seconds: float, ref_dir: Path) -> dict:
    """result.json: the final and the peak evaluation point of metrics.jsonl, plus what the run was."""
    rows = read_jsonl(out / METRICS)
    final = rows[-1] if rows else None
    peak = max(rows, key=lambda r: r["win_rate"]) if rows else None
    result = {
        "status": "completed", "task": cfg.task.name, "loss": cfg.loss.name, "beta": float(cfg.beta),
        "seed": int(cfg.seed), "run_name": cfg.run_name, "experiment": cfg.experiment,
        "final": final, "peak": peak, "n_eval_points": len(rows), "train_seconds": round(seconds, 1),
        "reference_dir": str(ref_dir), "output_dir": str(out),
    }
    tmp = out / f"{RESULT}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / RESULT)
    return result
