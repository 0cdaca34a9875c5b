"""Validation of the composed config at start: a bad value stops the run with a message that names the key
and the allowed values, before any model is loaded. The keys, types, option sets and ranges live in
:mod:`isdpo.schema`; here are the checks against implementation registries and the file system."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from isdpo import schema
from isdpo.losses import build_loss
from isdpo.models import DTYPES
from isdpo.schema import ConfigError, require
from isdpo.stages import STAGES
from isdpo.tasks import TASKS
from isdpo.trainer import accumulation

__all__ = ["ConfigError", "validate"]


def _dtype(key: str, value, nullable: bool = False) -> None:
    require(value in DTYPES or (nullable and value is None),
            f"{key}={value!r} is not supported; allowed: {', '.join(DTYPES)}{', null' if nullable else ''}")


def validate(cfg) -> None:
    """Raise ConfigError on the first invalid value of the composed config ``cfg``."""
    schema.check(cfg)
    require(cfg.stage in STAGES, f"stage={cfg.stage!r} is not known; allowed: {', '.join(STAGES)}")
    require(cfg.task.name in TASKS, f"task.name={cfg.task.name!r} is not known; allowed: {', '.join(sorted(TASKS))}")
    try:
        build_loss(cfg.loss.base, cfg.beta, OmegaConf.to_container(cfg.loss.params, resolve=True),
                   OmegaConf.to_container(cfg.loss.importance_sampling, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    hw, tr = cfg.hardware, cfg.task.train
    try:
        accumulation(tr.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    models = {"model": cfg.model}
    if "reward" in cfg.task:
        models["task.reward.model"] = cfg.task.reward.model
        _dtype("task.reward.score_dtype", cfg.task.reward.score_dtype, nullable=True)
    if "model" in cfg.judge and OmegaConf.is_dict(cfg.judge.model):
        models["judge.model"] = cfg.judge.model
    for key, model in models.items():
        _dtype(f"{key}.dtype", model.dtype)
    model = cfg.model
    if model.pretrained and str(model.pretrained).startswith(("/", ".", "~")):
        path = Path(str(model.pretrained)).expanduser()
        require(path.exists(), f"model.pretrained={model.pretrained!r}: no such file or directory")
        if model.gguf_file:
            require((path / model.gguf_file).exists(),
                    f"model.gguf_file={model.gguf_file!r}: not found in {path}")
