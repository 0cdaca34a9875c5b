"""stage=align: preference training with the configured loss, evaluated along the way (the
over-optimization curve); writes metrics.jsonl, policy/, result.json and checkpoints/last.ckpt."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from isdpo.artifacts import CHECKPOINT, EVALUATION, METRICS, POLICY, RESULT, SAMPLES, read_json, read_jsonl
from isdpo.callbacks import EvalCallback, PairEvaluator
from isdpo.data.loader import plan_steps
from isdpo.distributed import rank_world
from isdpo.flops import PerfMonitor
from isdpo.losses import build_loss
from isdpo.models import load_causal_lm, shared_copy
from isdpo.online import OnlinePairs
from isdpo.recipe import pair_collator, pair_loader, preference_module, prepare_model
from isdpo.run_guard import check_checkpoint, check_final_point, check_identity, check_steps, fit
from isdpo.stages.common import (load_reference, lora_settings, plain, reference_path, run_dir, save_model, stage_logger,
                                 task_of)
from isdpo.stages.evaluate import write_evaluation
from isdpo.stages.sft import run_sft
from isdpo.timing import TIMER
from isdpo.tracking import run_summary, write_run_summary
from isdpo.trainer import accumulation, build_trainer, finish_logger, full_state_dict


FINISHED = "finished"  # resume_point: the folder's run completed and left nothing to resume from


def resume_point(cfg, out: Path, fast_dev_run: bool) -> str | None:
    """The checkpoint to resume from (checked readable and from a run with the same config), :data:`FINISHED` when
    the folder's run completed with this config and kept no checkpoint (task.train.keep_checkpoints=false, or
    checkpoint_every_n_steps=0): its results stand, and training again would give the same numbers; or None."""
    ckpt = out / CHECKPOINT
    resume = str(ckpt) if cfg.task.train.resume and ckpt.exists() and not fast_dev_run else None
    # Decided from the files alone, so every data-parallel rank decides the same.
    finished = cfg.task.train.resume and not fast_dev_run and resume is None and (out / RESULT).exists()
    if rank_world()[0] != 0 or fast_dev_run:
        return FINISHED if finished else resume
    if resume:
        check_checkpoint(ckpt)
    check_identity(out, plain(cfg), resuming=resume is not None, replace=not cfg.task.train.resume)
    if finished:  # the identity check passed: the result is this config's
        return FINISHED
    if not resume:  # a fresh start: an earlier run's result must not outlive it
        (out / RESULT).unlink(missing_ok=True)
    return resume


def run_align(cfg, ref_dir: Path | None = None, fast_dev_run: bool = False, save_evaluation: bool = False) -> dict:
    """Preference training with the configured loss; returns result.json's content ({} on ranks > 0), which
    isdpo.stages.run_stage writes once the stage is done. A run that did not train its planned steps, or whose curve
    lacks the final evaluation, raises (isdpo.run_guard.RunIncomplete) instead.

    ``save_evaluation`` (stage=pipeline): the final evaluation point of the curve is also written as stage=evaluate
    writes it (evaluation.json, samples.jsonl: the same policy, evaluator and seed, so the same numbers), and
    stage=evaluate need not run; a run resumed at its end evaluates nothing and leaves them unwritten."""
    out = run_dir(cfg)
    resume = resume_point(cfg, out, fast_dev_run)  # before anything expensive: a mismatch stops here
    if resume == FINISHED:
        print(f"[isdpo] {out} holds this run, completed (result.json), with no checkpoint to resume at its end: "
              f"nothing to train. To train it again in place: task.train.resume=false")
        return read_json(out / RESULT) if rank_world()[0] == 0 else {}
    if ref_dir is None:  # still None afterwards when the task's reference is model.pretrained (no SFT)
        ref_dir = run_sft(cfg, fast_dev_run=fast_dev_run)
    task = task_of(cfg)
    reference = load_reference(cfg, task, ref_dir)
    loss_fn = build_loss(cfg.loss.base, cfg.beta, plain(cfg.loss.params), plain(cfg.loss.importance_sampling))
    with TIMER.phase("preferences"):
        # The precomputed reference log-probs under the training precision: at step 0 they equal the policy's.
        pairs = task.preference_examples(reference, ref_dir, cfg.hardware.precision)
    hw, tr = cfg.hardware, cfg.task.train
    # Before anything trains: a global batch the pairs cannot fill stops here, with the numbers.
    per_epoch, planned = plan_steps(len(pairs), tr.global_batch_size, what="training pairs",
                                    batch_key="task.train.global_batch_size", max_steps=tr.max_steps,
                                    epochs=tr.get("epochs"), drop_remainder=tr.drop_remainder,
                                    allow_key="task.train.drop_remainder",
                                    unit=hw.per_device_batch_size * hw.devices * hw.num_nodes)
    print(f"[isdpo] {len(pairs)} training pairs = {per_epoch} steps per epoch at global batch "
          f"{tr.global_batch_size}; training for {planned} steps")
    with TIMER.phase("evaluation"):
        evaluator = task.evaluator(reference, cfg.task.eval)
        held_out = PairEvaluator(task.eval_pairs(reference, cfg.task.eval), pad_id=task.pad_id,
                                 batch_size=cfg.hardware.per_device_batch_size)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # The policy starts as the reference (both from the SFT checkpoint, or both model.pretrained): a second copy, or
    # with LoRA adapters the reference's own weights in a module tree of its own (the reference is the policy
    # without its adapters, and only one copy of the weights is in memory).
    lora = lora_settings(cfg, "align")
    start = (shared_copy(reference) if lora else
             load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=reference_path(ref_dir)))
    policy = prepare_model(start, activation_checkpointing=hw.activation_checkpointing, strategy=hw.strategy,
                           compile=tr.compile, lora=lora, seed=cfg.seed)
    acc = accumulation(tr.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
    # loss.online (online DPO): the loader gives the pairs' prompts, in the same order, and each step samples and
    # labels its own pairs from the current policy (isdpo.online).
    online = OnlinePairs(task.score, pair_collator(task.pad_id, packing=tr.packing, share_prompt=tr.share_prompt),
                         pad_id=task.pad_id, eos_id=task.eos_id, max_new_tokens=cfg.task.eval.max_new_tokens,
                         seed=cfg.seed) if cfg.loss.online else None
    loader = pair_loader(pairs, batch_size=hw.per_device_batch_size, seed=cfg.seed, pad_id=task.pad_id,
                         num_workers=hw.num_workers, length_grouped=tr.length_grouped,
                         group_batches=tr.group_batches, packing=tr.packing, share_prompt=tr.share_prompt,
                         prompts_only=online is not None, accumulate=acc)
    module = preference_module(policy, reference, loss_fn, lr=tr.lr, weight_decay=tr.weight_decay,
                               warmup_steps=tr.warmup_steps, schedule=tr.schedule,
                               response_only=tr.response_only_logits, concatenated=tr.concatenated_forward,
                               fused_adamw=tr.fused_adamw, strategy=hw.strategy, online=online)
    every = cfg.logger.log_every_n_steps  # optimizer steps between two rows of training metrics
    # The throughput monitor must come before the evaluation, which it must not time.
    curve = EvalCallback(evaluator, out / METRICS, cfg.task.eval.every_n_steps, held_out)
    callbacks = [PerfMonitor(peak_flops=hw.get("peak_flops", "auto"), log_every_n_steps=every), curve]
    logger = stage_logger(cfg, "align")
    try:
        # max_steps null (task=preference): task.train.epochs passes over the pairs.
        epochs = tr.epochs if tr.max_steps is None else None
        trainer = build_trainer(hw, max_steps=tr.max_steps if epochs is None else -1, max_epochs=epochs,
                                accumulate=acc, run_dir=out, logger=logger,
                                callbacks=callbacks, gradient_clip_val=tr.gradient_clip_val,
                                checkpoint_every_n_steps=0 if fast_dev_run else tr.checkpoint_every_n_steps,
                                fast_dev_run=fast_dev_run, model=policy, log_every_n_steps=every,
                                frozen=[] if lora else [reference])  # LoRA: the reference's weights are the policy's
        if resume:
            print(f"[isdpo] resuming from {resume}")
        if save_evaluation and trainer.is_global_zero:  # an earlier run's would outlive this one's policy
            for name in (EVALUATION, SAMPLES):
                (out / name).unlink(missing_ok=True)
        started = time.time()
        with TIMER.phase("train"):
            fit(trainer, module, loader, ckpt_path=resume)
        check_steps(trainer.global_step, None if fast_dev_run else planned)
        curve.finish(trainer, module)  # a run resumed at its end: Lightning ran none of the curve's hooks
        if tr.checkpoint_every_n_steps > 0 and not fast_dev_run:
            # The final state too, so rerunning a finished job resumes at its end instead of retraining.
            trainer.save_checkpoint(out / CHECKPOINT)
        whole = full_state_dict(trainer)  # FSDP: each rank holds a shard; gathering is a collective
        if not trainer.is_global_zero:  # other data-parallel ranks stop here; rank zero writes
            return {}
        result = completed_result(cfg, out, time.time() - started, ref_dir, trainer.global_step)
        save_model(policy, task, out / POLICY, merged=bool(lora) and cfg.peft.merge_on_save, state_dict=whole)
        if lora and ref_dir is None and cfg.model.gguf_file:  # transformers loads a GGUF base only with its file named
            print(f"[isdpo] policy/ holds LoRA adapters on the GGUF file {cfg.model.gguf_file}; load them with "
                  f'AutoPeftModelForCausalLM.from_pretrained("{out / POLICY}", gguf_file="{cfg.model.gguf_file}")')
        log_run_summary(logger, out, result["status"])
        final = curve.last_evaluation
        # One process: the evaluated policy is the saved one (a sharded policy is evaluated again from policy/).
        if save_evaluation and final is not None and final[0] == trainer.global_step and trainer.world_size == 1:
            write_evaluation(out, final[1], str(out / POLICY))
    except BaseException as err:
        # A stopped run's summary says so, with the curve it has: W&B's runs table then shows why it ends early.
        log_run_summary(logger, out, "interrupted" if isinstance(err, (SystemExit, KeyboardInterrupt)) else "failed",
                        quiet=True)
        raise
    finally:
        finish_logger(logger)
    return result


def log_run_summary(logger, out: Path, status: str, quiet: bool = False) -> None:
    """The run's W&B summary and curve table (isdpo.tracking) from its metrics.jsonl: at the end, again on a resume,
    and when it stops; ``quiet``: a failure here is only printed (the error that stopped the run is the one to see)."""
    try:
        rows = read_jsonl(out / METRICS)
        peak, by = peak_point(rows)
        write_run_summary(logger, run_summary(status, rows, peak, by), rows)
    except Exception as err:  # noqa: BLE001
        if not quiet:
            raise
        print(f"[isdpo] warning: could not write the W&B summary: {err}")


def peak_point(rows: list[dict]) -> tuple[dict | None, str | None]:
    """(the best evaluation point, by what): the highest golden win rate; without one (no golden reward), the
    highest held-out preference accuracy, ties to the lower held-out loss."""
    if not rows:
        return None, None
    if all("win_rate" in r for r in rows):
        return max(rows, key=lambda r: r["win_rate"]), "win_rate"
    if all("rewards/accuracies" in r for r in rows):
        return max(rows, key=lambda r: (r["rewards/accuracies"], -r["loss"])), "rewards/accuracies"
    return None, None


def summary(result: dict) -> str:
    """One line on a finished run: its final and peak evaluation points (result.json's)."""
    f, p = result["final"], result.get("peak")
    if "win_rate" in f:
        peak = f", peak {p['win_rate']:.3f} (step {p['step']})" if p else ""
        return f"final win rate {f['win_rate']:.3f} (step {f['step']}){peak}, final KL {f['kl']:.3f}"
    if "rewards/accuracies" in f:
        peak = f", peak accuracy {p['rewards/accuracies']:.3f} (step {p['step']})" if p else ""
        return (f"final held-out accuracy {f['rewards/accuracies']:.3f}, loss {f['loss']:.4f} (step {f['step']})"
                f"{peak}")
    return f"finished at step {f['step']} (no evaluation metrics: no golden reward and task.eval.n_pairs=0)"


def completed_result(cfg, out: Path, seconds: float, ref_dir: Path | None, step: int) -> dict:
    """result.json's content: the final and the peak evaluation point of metrics.jsonl, plus what the run was;
    raises RunIncomplete when the curve does not end with the evaluation at the last step ``step``."""
    rows = read_jsonl(out / METRICS)
    check_final_point(out / METRICS, rows, step)
    final = rows[-1]
    peak, peak_by = peak_point(rows)
    result = {
        "status": "completed", "task": cfg.task.name, "loss": cfg.loss.name, "beta": float(cfg.beta),
        "seed": int(cfg.seed), "run_name": cfg.run_name, "experiment": cfg.experiment,
        "final": final, "peak": peak, "peak_by": peak_by, "n_eval_points": len(rows),
        "train_seconds": round(seconds, 1),
        "reference_dir": str(ref_dir) if ref_dir is not None else str(cfg.model.pretrained), "output_dir": str(out),
    }
    return result
