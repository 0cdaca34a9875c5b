"""What every stage shares: the run folder, the task, the reference, a stage's logger."""
from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from isdpo.artifacts import MERGED, atomic_path, config_hash
from isdpo.models import (freeze, has_adapters, is_adapter_dir, load_adapter, load_causal_lm, merge_adapters,
                          save_adapter, shared_copy)
from isdpo.tasks import Task, build_task
from isdpo.tracking import define_metrics
from isdpo.trainer import build_logger

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")  # what the adapters are (isdpo.models.add_lora)

# The frozen reference is in eval mode on purpose; Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def plain(cfg) -> dict:
    """The resolved config (or a block of it) as plain dicts and lists."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def run_dir(cfg) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def task_of(cfg) -> Task:
    return build_task(cfg.task, cfg.model, cfg.paths.cache_dir, cfg.paths.output_dir)


def reference_path(ref_dir: Path | None) -> str | None:
    """The reference model's folder in stage=sft's entry ``ref_dir``; None (= ``model.pretrained``) without one."""
    return str(ref_dir / "model") if ref_dir is not None else None


def load_reference(cfg, task: Task, ref_dir: Path | None):
    """The frozen reference: stage=sft's model (its entry ``ref_dir``), or ``model.pretrained`` when None."""
    return freeze(load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=reference_path(ref_dir)))


def lora_settings(cfg, stage: str) -> dict | None:
    """The LoRA adapters' settings when ``stage`` trains ``cfg.model`` with them (``peft=lora``, the stage in
    ``peft.stages``); None when it trains all the weights."""
    p = cfg.peft
    return {k: plain(p)[k] for k in LORA_KEYS} if p.backend == "lora" and stage in p.stages else None


def load_policy(cfg, task: Task, path: str | None, reference):
    """A saved policy: a model folder (None: ``model.pretrained``), or a LoRA adapter (``peft=lora``'s policy/)
    put on the weights of ``reference``, its base (one copy of the weights in memory)."""
    if is_adapter_dir(path):
        return load_adapter(shared_copy(reference), path)
    return load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=path)


def save_model(model, task: Task, path: Path, *, merged: bool = False, state_dict=None) -> None:
    """A Hugging Face folder that loads with ``from_pretrained`` (with the task's tokenizer, if it has one). A model
    with LoRA adapters writes the adapter (PEFT's format) and, with ``merged``, also ``merged/``: a plain model with
    the adapters merged in. ``state_dict``: the model's whole weights when it is sharded (isdpo.trainer.full_state_dict).
    The folder is written whole or not at all (isdpo.artifacts.atomic_path: a failed write names it and the cause)."""
    with atomic_path(path) as tmp:
        if has_adapters(model):
            save_adapter(model, tmp)
            if merged:
                save_model(merge_adapters(model), task, tmp / MERGED)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(tmp)


def stage_logger(cfg, job_type: str):
    """The run's logger for one stage; its W&B id is deterministic from the output folder (itself
    deterministic from the overrides), so a requeued or rerun job continues the same W&B run."""
    out = run_dir(cfg)
    logger = build_logger(
        cfg.logger, run_dir=out, run_name=cfg.run_name, group=cfg.experiment, job_type=job_type,
        tags=[f"loss:{cfg.loss.name}", f"beta:{cfg.beta}", f"task:{cfg.task.name}", f"seed:{cfg.seed}"],
        run_id=f"{config_hash(str(out.resolve()), 10)}-{job_type}", config=plain(cfg),
    )
    define_metrics(logger)
    return logger
