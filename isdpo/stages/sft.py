"""stage=sft: the reference policy, trained once per (task data, model, sft block) and cached."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import lightning as L

from isdpo.artifacts import cached_dir, sft_dir_key
from isdpo.models import load_causal_lm
from isdpo.module import SFTModule
from isdpo.recipe import prepare_model, sft_loader
from isdpo.run_guard import fit
from isdpo.stages.common import save_model, stage_logger, task_of
from isdpo.tasks import Task
from isdpo.trainer import accumulation, build_trainer, finish_logger


def sft_micro_batch(global_batch: int, hw) -> tuple[int, int]:
    """(sequences per device per micro-batch, accumulation) keeping SFT's global batch fixed on every
    hardware; ``hardware.sft_per_device_batch_size`` null = the whole per-device share (no accumulation)."""
    world = int(hw.devices) * int(hw.num_nodes)
    per_device = hw.get("sft_per_device_batch_size") or max(int(global_batch) // world, 1)
    return int(per_device), accumulation(int(global_batch), int(per_device), int(hw.devices), int(hw.num_nodes))


def sft_reference(task: Task, model_cfg, sft_cfg, hw, *, cache_dir: str | Path, make_logger: Callable[[], Any],
                  fast_dev_run: bool = False) -> Path:
    """The SFT model of ``model_cfg`` on ``task``'s SFT set (trained, or reused from the store); returns the
    entry's directory (``model/`` inside). ``make_logger()`` gives the logger of a training that runs."""
    key = sft_dir_key(task.sft_key(), model_cfg, sft_cfg, fast_dev_run)

    def build(tmp: Path) -> None:
        L.seed_everything(sft_cfg.seed, workers=True, verbose=False)
        model = prepare_model(load_causal_lm(model_cfg, vocab_size=task.vocab_size),
                              activation_checkpointing=hw.activation_checkpointing, strategy=hw.strategy)
        per_device, acc = sft_micro_batch(sft_cfg.batch_size, hw)
        loader = sft_loader(task.sft_examples(), batch_size=per_device, seed=sft_cfg.seed, pad_id=task.pad_id,
                            num_workers=hw.num_workers)
        module = SFTModule(model, lr=sft_cfg.lr, weight_decay=sft_cfg.weight_decay,
                           warmup_steps=sft_cfg.warmup_steps, schedule=sft_cfg.schedule)
        logger = make_logger()
        try:
            trainer = build_trainer(hw, max_steps=-1, max_epochs=sft_cfg.epochs, accumulate=acc, run_dir=tmp,
                                    logger=logger, callbacks=[], fast_dev_run=fast_dev_run, model=model)
            fit(trainer, module, loader)
        finally:
            finish_logger(logger)
        if trainer.is_global_zero:
            save_model(model, task, tmp / "model")
        shutil.rmtree(tmp / "lightning_logs", ignore_errors=True)

    path, hit = cached_dir(cache_dir, "sft", key, build, collective=True)
    print(f"[isdpo] SFT reference {'reused from cache' if hit else 'trained'}: {path}")
    return path


def run_sft(cfg, fast_dev_run: bool = False) -> Path:
    """The reference policy of the run (the SFT of ``cfg.model`` on the task's SFT set)."""
    return sft_reference(task_of(cfg), cfg.model, cfg.task.sft, cfg.hardware, cache_dir=cfg.paths.cache_dir,
                         make_logger=lambda: stage_logger(cfg, "sft"), fast_dev_run=fast_dev_run)
