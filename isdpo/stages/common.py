"""What every stage shares: the run folder, the task, the reference, a stage's logger."""
from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from isdpo.artifacts import config_hash
from isdpo.models import freeze, load_causal_lm
from isdpo.tasks import Task, build_task
from isdpo.trainer import build_logger

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


def load_reference(cfg, task: Task, ref_dir: Path):
    """The frozen SFT reference (its directory as returned by stage=sft)."""
    return freeze(load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=str(ref_dir / "model")))


def save_model(model, task: Task, path: Path) -> None:
    """A Hugging Face folder that loads with ``from_pretrained`` (with the task's tokenizer, if it has one)."""
    model.save_pretrained(path)
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(path)


def stage_logger(cfg, job_type: str):
    """The run's logger for one stage; its W&B id is deterministic from the output folder (itself
    deterministic from the overrides), so a requeued or rerun job continues the same W&B run."""
    out = run_dir(cfg)
    return build_logger(
        cfg.logger, run_dir=out, run_name=cfg.run_name, group=cfg.experiment, job_type=job_type,
        tags=[f"loss:{cfg.loss.name}", f"beta:{cfg.beta}", f"task:{cfg.task.name}", f"seed:{cfg.seed}"],
        run_id=f"{config_hash(str(out.resolve()), 10)}-{job_type}", config=plain(cfg),
    )
