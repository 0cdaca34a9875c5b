"""Validation of the composed config at start: a bad value stops the run with a message that names the key
and the allowed values, before any model is loaded. The keys, types, option sets and ranges live in
:mod:`isdpo.schema`; here are the checks against implementation registries and the file system."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from isdpo import schema
from isdpo.data.rows import DataError
from isdpo.judge import JudgeError
from isdpo.losses import build_loss
from isdpo.models import DTYPES
from isdpo.module import NonFiniteError
from isdpo.run_guard import CheckpointUnreadable, ConfigMismatch, RunFolderBusy
from isdpo.schema import ConfigError, require
from isdpo.stages import STAGES
from isdpo.tasks import TASKS
from isdpo.trainer import accumulation

__all__ = ["ConfigError", "USER_ERRORS", "validate"]

# Errors whose message says what to fix (a key, a data row, a path, a folder in use): launch.py prints the message
# alone, without the traceback, which says nothing more to the user (ISDPO_TRACEBACK=1 shows it).
USER_ERRORS = (ConfigError, DataError, RunFolderBusy, ConfigMismatch, CheckpointUnreadable, NonFiniteError,
               JudgeError)


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
        # The policy's checkpoint must exist now; a later stage's (the golden RM's, the judge's) may still be coming.
        _checkpoint(key, model, must_exist=key == "model")


def _checkpoint(key: str, model, must_exist: bool) -> None:
    """A GGUF checkpoint has its package; a local checkpoint exists (``must_exist``), and a folder holding a GGUF
    file names it (transformers' own errors say neither: "Please install torch and gguf", a tokenizer's
    ValueError)."""
    gguf, pretrained = model.gguf_file, model.pretrained
    require(not gguf or importlib.util.find_spec("gguf") is not None,
            f'{key}.gguf_file={gguf!r} needs the gguf package: pip install -e ".[gguf]" (or pip install '
            f'"gguf>=0.10" accelerate)')
    if not pretrained:
        return
    path = Path(str(pretrained)).expanduser()
    if not (str(pretrained).startswith(("/", ".", "~")) or path.exists()):
        return  # a hub id
    require(path.exists() or not must_exist, f"{key}.pretrained={pretrained!r}: no such file or directory")
    if not path.exists():
        return
    if gguf:
        require((path / gguf).exists(), f"{key}.gguf_file={gguf!r}: not found in {path}")
    elif path.is_dir() and not (path / "config.json").exists():
        found = sorted(f.name for f in path.glob("*.gguf"))
        require(not found, f"{key}.pretrained={pretrained!r}: this folder holds a GGUF file: set {key}.gguf_file="
                           f"{found[0] if found else ''}" + (f" (it holds {len(found)}: {', '.join(found)})"
                                                              if len(found) > 1 else ""))
