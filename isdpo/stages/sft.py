"""stage=sft: the reference policy, trained once per (task data, model, sft block) and cached."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L

from isdpo.artifacts import cached_dir, sft_dir_key
from isdpo.data.loader import plan_steps
from isdpo.models import load_causal_lm, merge_adapters
from isdpo.module import SFTModule
from isdpo.recipe import prepare_model, sft_loader
from isdpo.run_guard import check_steps, fit
from isdpo.stages.common import lora_settings, save_model, stage_logger, task_of
from isdpo.tasks import Task
from isdpo.timing import TIMER
from isdpo.trainer import accumulation, build_trainer, finish_logger, full_state_dict


def sft_micro_batch(global_batch: int, hw) -> tuple[int, int]:
    """(sequences per device per micro-batch, accumulation) keeping SFT's global batch fixed on every
    hardware; ``hardware.sft_per_device_batch_size`` null = the whole per-device share (no accumulation)."""
    world = int(hw.devices) * int(hw.num_nodes)
    per_device = hw.get("sft_per_device_batch_size") or max(int(global_batch) // world, 1)
    return int(per_device), accumulation(int(global_batch), int(per_device), int(hw.devices), int(hw.num_nodes),
                                         keys=("task.sft.batch_size", "hardware.sft_per_device_batch_size"))


@TIMER.phase("sft")
def sft_reference(task: Task, model_cfg, sft_cfg, hw, *, cache_dir: str | Path, make_logger: Callable[[], Any],
                  fast_dev_run: bool = False, lora: Mapping[str, Any] | None = None, log_every_n_steps: int = 10) -> Path:
    """The SFT model of ``model_cfg`` on ``task``'s SFT set (trained, or reused from the store); returns the
    entry's directory (``model/`` inside). ``make_logger()`` gives the logger of a training that runs (which gets
    the training metrics every ``log_every_n_steps`` steps). With ``lora`` (adapter settings) only LoRA adapters
    train, and the entry holds them merged: a plain model."""
    key = sft_dir_key(task.sft_key(), model_cfg, sft_cfg, fast_dev_run)
    if lora is not None:  # an SFT in full keeps the key it had before LoRA existed
        key["lora"] = dict(lora)

    def build(tmp: Path) -> None:
        L.seed_everything(sft_cfg.seed, workers=True, verbose=False)
        model = prepare_model(load_causal_lm(model_cfg, vocab_size=task.vocab_size),
                              activation_checkpointing=hw.activation_checkpointing, strategy=hw.strategy,
                              lora=lora, seed=sft_cfg.seed)
        per_device, acc = sft_micro_batch(sft_cfg.batch_size, hw)
        examples = task.sft_examples()
        # SFT sets are large: the sequences left over after an epoch's last whole batch are skipped (no key: the
        # cached references keep their keys); a batch they cannot fill once stops here.
        _, planned = plan_steps(len(examples), int(sft_cfg.batch_size), what="SFT sequences",
                                batch_key="task.sft.batch_size", epochs=int(sft_cfg.epochs),
                                unit=per_device * int(hw.devices) * int(hw.num_nodes))
        loader = sft_loader(examples, batch_size=per_device, seed=sft_cfg.seed, pad_id=task.pad_id,
                            num_workers=hw.num_workers, accumulate=acc)
        module = SFTModule(model, lr=sft_cfg.lr, weight_decay=sft_cfg.weight_decay,
                           warmup_steps=sft_cfg.warmup_steps, schedule=sft_cfg.schedule)
        logger = make_logger()
        try:
            trainer = build_trainer(hw, max_steps=-1, max_epochs=sft_cfg.epochs, accumulate=acc, run_dir=tmp,
                                    logger=logger, callbacks=[], fast_dev_run=fast_dev_run, model=model,
                                    log_every_n_steps=log_every_n_steps)
            fit(trainer, module, loader)
        finally:
            finish_logger(logger)
        check_steps(trainer.global_step, None if fast_dev_run else planned)  # never publish an untrained reference
        whole = full_state_dict(trainer)  # FSDP: each rank holds a shard; gathering is a collective
        if trainer.is_global_zero:
            # LoRA adapters merged: downstream stages load a plain model
            save_model(merge_adapters(model), task, tmp / "model", state_dict=whole)
        shutil.rmtree(tmp / "lightning_logs", ignore_errors=True)

    path, hit = cached_dir(cache_dir, "sft", key, build, collective=True)
    print(f"[isdpo] SFT reference {'reused from cache' if hit else 'trained'}: {path}")
    return path


def run_sft(cfg, fast_dev_run: bool = False) -> Path | None:
    """The reference policy of the run (the SFT of ``cfg.model`` on the task's SFT set); None when the task's
    reference is ``model.pretrained`` itself (no SFT)."""
    task = task_of(cfg)
    if task.reference_source() == "pretrained":
        print(f"[isdpo] no SFT stage (task.sft.enabled=false): the reference is model.pretrained={cfg.model.pretrained}")
        return None
    return sft_reference(task, cfg.model, cfg.task.sft, cfg.hardware, cache_dir=cfg.paths.cache_dir,
                         make_logger=lambda: stage_logger(cfg, "sft"), fast_dev_run=fast_dev_run,
                         lora=lora_settings(cfg, "sft"), log_every_n_steps=cfg.logger.log_every_n_steps)
