"""The experiment's stages: sft -> align -> evaluate, and pipeline (all of them).

Each stage takes the composed config (an omegaconf DictConfig or a plain
mapping) and reads/writes files under ``cfg.paths``; nothing here imports Hydra.
The SFT reference is cached by a hash of what it depends on, so every job of a
sweep reuses it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from isdpo.cache import cached_dir, config_hash, rank_world
from isdpo.callbacks import EvalCallback, read_jsonl
from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.data.batching import LengthGroupedLoader, PackedPreferenceCollator
from isdpo.data.loader import ResumableLoader
from isdpo.flops import ThroughputMonitor
from isdpo.logprobs import compile_decoder
from isdpo.losses import build_loss
from isdpo.models import freeze, load_causal_lm
from isdpo.module import PreferenceModule, SFTModule
from isdpo.run_guard import check_checkpoint, check_identity, fit, run_folder_lock
from isdpo.trainer import accumulation, build_logger, build_trainer

# The frozen reference is in eval mode on purpose; Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

STAGES = ("sft", "reward", "relabel", "align", "evaluate", "judge", "pipeline")
TEXT_TASKS = ("tldr", "hh")


def task_runtime(cfg):
    name = cfg.task.name
    if name == "synthetic":
        from isdpo.data.synthetic_runtime import SyntheticRuntime

        return SyntheticRuntime(cfg.task, cfg.paths.cache_dir)
    if name in TEXT_TASKS:
        from isdpo.data.text_runtime import TextRuntime

        return TextRuntime(cfg.task, cfg.model, cfg.paths.cache_dir, cfg.paths.output_dir)
    raise ValueError(f"task.name={name!r} is not known; allowed: synthetic, {', '.join(TEXT_TASKS)}")


def _container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def run_dir(cfg) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _logger(cfg, job_type: str):
    out = run_dir(cfg)
    return build_logger(
        cfg.logger, run_dir=out, run_name=cfg.run_name, group=cfg.experiment, job_type=job_type,
        tags=[f"loss:{cfg.loss.name}", f"beta:{cfg.beta}", f"task:{cfg.task.name}", f"seed:{cfg.seed}"],
        # Deterministic from the output folder (itself deterministic from the overrides): a requeued or
        # rerun job continues the same W&B run.
        run_id=f"{config_hash(str(out.resolve()), 10)}-{job_type}", config=_container(cfg),
    )


def _finish(logger) -> None:
    if logger and hasattr(logger, "experiment") and logger.__class__.__name__ == "WandbLogger":
        import wandb

        try:
            wandb.finish()
        except Exception as err:  # noqa: BLE001
            # On a SLURM requeue every process of the job gets SIGTERM, W&B's service included; an error
            # here must not replace submitit's requeue exit (Hydra would mark the job failed).
            print(f"[isdpo] warning: wandb.finish() failed: {err}")


def sft_micro_batch(global_batch: int, hw) -> tuple[int, int]:
    """(sequences per device per micro-batch, accumulation) keeping SFT's global batch fixed on every
    hardware; ``hardware.sft_per_device_batch_size`` null = the whole per-device share (no accumulation)."""
    world = int(hw.devices) * int(hw.num_nodes)
    per_device = hw.get("sft_per_device_batch_size") or max(int(global_batch) // world, 1)
    return int(per_device), accumulation(int(global_batch), int(per_device), int(hw.devices), int(hw.num_nodes))


def run_sft(cfg, fast_dev_run: bool = False) -> Path:
    """Train (or fetch from the cache) the reference policy; returns its directory."""
    rt = task_runtime(cfg)
    key = {"task": rt.sft_key(), "model": _container(cfg.model), "sft": _container(cfg.task.sft),
           "fast_dev_run": fast_dev_run}

    def build(tmp: Path) -> None:
        L.seed_everything(cfg.task.sft.seed, workers=True, verbose=False)
        model = load_causal_lm(cfg.model, vocab_size=rt.vocab_size)
        data = rt.sft_examples()
        hw, sft = cfg.hardware, cfg.task.sft
        per_device, acc = sft_micro_batch(sft.batch_size, hw)
        loader = ResumableLoader(data, batch_size=per_device, seed=sft.seed,
                                 collate_fn=SFTCollator(rt.pad_id), num_workers=hw.num_workers)
        module = SFTModule(model, lr=sft.lr, weight_decay=sft.weight_decay,
                           warmup_steps=sft.warmup_steps, schedule=sft.schedule)
        logger = _logger(cfg, "sft")
        try:
            trainer = build_trainer(hw, max_steps=-1, max_epochs=sft.epochs, accumulate=acc,
                                    run_dir=tmp, logger=logger, callbacks=[], fast_dev_run=fast_dev_run)
            fit(trainer, module, loader)
        finally:
            _finish(logger)
        if trainer.is_global_zero:
            model.save_pretrained(tmp / "model")
            if getattr(rt, "tokenizer", None) is not None:
                rt.tokenizer.save_pretrained(tmp / "model")
        shutil.rmtree(tmp / "lightning_logs", ignore_errors=True)

    path, hit = cached_dir(cfg.paths.cache_dir, "sft", key, build, collective=True)
    print(f"[isdpo] SFT reference {'reused from cache' if hit else 'trained'}: {path}")
    return path


def _load_reference(cfg, ref_dir: Path):
    rt = task_runtime(cfg)
    return rt, freeze(load_causal_lm(cfg.model, vocab_size=rt.vocab_size, path=str(ref_dir / "model")))


def _resume_point(cfg, out: Path, fast_dev_run: bool) -> str | None:
    """The checkpoint to resume from (checked readable and from a run with the same config), or None."""
    ckpt = out / "checkpoints" / "last.ckpt"
    resume = str(ckpt) if cfg.task.train.resume and ckpt.exists() and not fast_dev_run else None
    if rank_world()[0] != 0 or fast_dev_run:
        return resume
    if resume:
        check_checkpoint(ckpt)
    check_identity(out, _container(cfg), resuming=resume is not None, replace=not cfg.task.train.resume)
    if not resume:  # a fresh start: an earlier run's result must not outlive it
        (out / "result.json").unlink(missing_ok=True)
    return resume


def run_align(cfg, ref_dir: Path | None = None, fast_dev_run: bool = False) -> dict:
    """Preference training with the configured loss; writes metrics.jsonl, the policy and result.json."""
    out = run_dir(cfg)
    resume = _resume_point(cfg, out, fast_dev_run)  # before anything expensive: a mismatch stops here
    ref_dir = ref_dir or run_sft(cfg, fast_dev_run=fast_dev_run)
    rt, reference = _load_reference(cfg, ref_dir)
    loss_fn = build_loss(cfg.loss.base, cfg.beta, _container(cfg.loss.params),
                         _container(cfg.loss.importance_sampling))
    pairs = rt.preference_examples(reference, ref_dir)
    evaluator = rt.evaluator(reference, cfg.task.eval)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # The policy starts as a copy of the reference (both from the SFT checkpoint).
    policy = load_causal_lm(cfg.model, vocab_size=rt.vocab_size, path=str(ref_dir / "model"))
    hw, tr = cfg.hardware, cfg.task.train
    acc = accumulation(tr.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
    collate = (PackedPreferenceCollator(rt.pad_id, share_prompt=tr.share_prompt) if tr.packing
               else PreferenceCollator(rt.pad_id))
    if tr.length_grouped:
        loader = LengthGroupedLoader(pairs, batch_size=hw.per_device_batch_size, seed=cfg.seed, collate_fn=collate,
                                     num_workers=hw.num_workers, group_batches=tr.group_batches)
    else:
        loader = ResumableLoader(pairs, batch_size=hw.per_device_batch_size, seed=cfg.seed, collate_fn=collate,
                                 num_workers=hw.num_workers)
    if hw.get("activation_checkpointing") and hw.strategy != "fsdp":
        policy.gradient_checkpointing_enable()
    if tr.compile:
        compile_decoder(policy)
    module = PreferenceModule(policy, reference, loss_fn, lr=tr.lr, weight_decay=tr.weight_decay,
                              warmup_steps=tr.warmup_steps, schedule=tr.schedule,
                              response_only=tr.response_only_logits, concatenated=tr.concatenated_forward,
                              fused_adamw=tr.fused_adamw and hw.strategy != "fsdp")
    metrics_path = out / "metrics.jsonl"
    # The throughput monitor must come before the evaluation, which it must not time.
    callbacks = [ThroughputMonitor(peak_flops=hw.get("peak_flops", "auto")),
                 EvalCallback(evaluator, metrics_path, cfg.task.eval.every_n_steps)]
    logger = _logger(cfg, "align")
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
            trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
        if not trainer.is_global_zero:  # other data-parallel ranks stop here; rank zero writes
            return {}
        policy.save_pretrained(out / "policy")
        if getattr(rt, "tokenizer", None) is not None:  # policy/ loads with AutoTokenizer too
            rt.tokenizer.save_pretrained(out / "policy")
        result = write_result(cfg, out, time.time() - started, ref_dir)
    finally:
        _finish(logger)
    return result


def write_result(cfg, out: Path, seconds: float, ref_dir: Path) -> dict:
    """result.json: the final and the peak evaluation point of metrics.jsonl, plus what the run was."""
    rows = read_jsonl(out / "metrics.jsonl")
    final = rows[-1] if rows else None
    peak = max(rows, key=lambda r: r["win_rate"]) if rows else None
    result = {
        "status": "completed", "task": cfg.task.name, "loss": cfg.loss.name, "beta": float(cfg.beta),
        "seed": int(cfg.seed), "run_name": cfg.run_name, "experiment": cfg.experiment,
        "final": final, "peak": peak, "n_eval_points": len(rows), "train_seconds": round(seconds, 1),
        "reference_dir": str(ref_dir), "output_dir": str(out),
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "result.json")
    return result


def run_evaluate(cfg, ref_dir: Path | None = None) -> dict:
    """Evaluate ``<output_dir>/policy`` (or the reference if there is none yet) once."""
    ref_dir = ref_dir or run_sft(cfg)
    rt, reference = _load_reference(cfg, ref_dir)
    out = run_dir(cfg)
    policy_dir = out / "policy"
    policy = load_causal_lm(cfg.model, vocab_size=rt.vocab_size,
                            path=str(policy_dir if policy_dir.exists() else ref_dir / "model"))
    if cfg.hardware.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # Lightning places the models during training; a standalone evaluation must do it itself.
        policy, reference = policy.cuda(), reference.cuda()
    res = rt.evaluator(reference, cfg.task.eval)(policy)
    prompts, responses, scores = res.pop("samples")
    with (out / "samples.jsonl").open("w") as fh:
        for p, r, s in zip(prompts, responses, scores.tolist()):
            fh.write(json.dumps({"prompt_ids": p, "response_ids": r, "golden_reward": s}) + "\n")
    res["policy"] = str(policy_dir if policy_dir.exists() else ref_dir / "model")
    (out / "evaluation.json").write_text(json.dumps(res, indent=2))
    return res


def run_stage(cfg, fast_dev_run: bool = False) -> Any:
    """Run ``cfg.stage`` holding the run folder's lock (one process per folder at a time)."""
    if cfg.hardware.get("torch_threads"):
        torch.set_num_threads(int(cfg.hardware.torch_threads))
    with run_folder_lock(run_dir(cfg)):
        return _run_stage(cfg, fast_dev_run)


def _run_stage(cfg, fast_dev_run: bool) -> Any:
    stage = cfg.stage
    if stage == "sft":
        return run_sft(cfg, fast_dev_run=fast_dev_run)
    if stage == "reward":
        from isdpo.reward import run_reward_stage

        return run_reward_stage(cfg, fast_dev_run=fast_dev_run)
    if stage == "relabel":
        from isdpo.relabel import run_relabel_stage

        return run_relabel_stage(cfg, fast_dev_run=fast_dev_run)
    if stage == "align":
        return run_align(cfg, fast_dev_run=fast_dev_run)
    if stage == "evaluate":
        return run_evaluate(cfg)
    if stage == "judge":
        from isdpo.judge_stage import run_judge_stage

        return run_judge_stage(cfg)
    if stage == "pipeline":
        ref = run_sft(cfg, fast_dev_run=fast_dev_run)
        if cfg.task.name in TEXT_TASKS:  # the golden RM labels the pairs and judges the evaluations
            from isdpo.relabel import run_relabel_stage
            from isdpo.reward import run_reward_stage

            run_reward_stage(cfg, fast_dev_run=fast_dev_run)
            if cfg.task.train.preferences == "relabelled":
                run_relabel_stage(cfg, fast_dev_run=fast_dev_run)
        result = run_align(cfg, ref_dir=ref, fast_dev_run=fast_dev_run)
        if result:  # empty on data-parallel ranks other than zero
            run_evaluate(cfg, ref_dir=ref)
            if cfg.judge.backend != "none":
                from isdpo.judge_stage import run_judge_stage

                result["judge"] = run_judge_stage(cfg)
        return result
    raise ValueError(f"stage={stage!r} is not known; allowed: {', '.join(STAGES)}")
