"""Validation of the composed config at start: a bad value stops the run with a message
that names the key and the allowed values, before any model is loaded."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

from isdpo.losses import build_loss
from isdpo.trainer import accumulation

STAGES = ("sft", "reward", "relabel", "align", "evaluate", "judge", "pipeline")
TASKS = ("synthetic", "tldr", "hh")
LOGGERS = ("wandb", "csv", "none")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
WANDB_MODES = ("auto", "online", "offline", "disabled")
SEED_KEYS = ("seed", "task.sft.seed", "task.eval.seed")
SEED_LIMIT = 2**32  # numpy's and torch's seeds are unsigned 32-bit
_ABSENT = object()


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, (int, float)) and not isinstance(value, bool),
             f"{key} must be a number (got {value!r})")
    return value


def _seed(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and key != "seed":
        return  # an optional seed this task does not define
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT,
             f"{key} must be an integer in [0, 2**32) (got {value!r})")


def _added_keys(cfg, overrides: Iterable[str]) -> list[str]:
    """Keys that ``+key=value`` overrides added as values. ``+group=option`` (a new defaults entry, e.g.
    ``+sweep=NAME``) adds no value at its key (a ``_global_`` package) or a node built from an option name;
    ``++key`` is Hydra's explicit force-add and is left alone."""
    added = []
    for override in overrides:
        if not override.startswith("+") or override.startswith("++") or "=" not in override:
            continue
        key, value = override[1:].split("=", 1)
        key = key.strip()
        node = _ABSENT if "/" in key or "@" in key else OmegaConf.select(
            cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if node is _ABSENT:
            continue  # a config group with a `_global_` package (e.g. +sweep=NAME): nothing at its key
        if OmegaConf.is_dict(node) and not value.lstrip().startswith("{"):
            continue  # a config group's option (a non-global package)
        added.append(key)
    return added


def _unknown_root(cfg, key: str, added: set[str]) -> str:
    """The shallowest part of ``key`` that exists only because of ``+`` overrides: ``+task.trainn.lr=1``
    adds ``task.trainn`` (whose only key came from the override), not just ``lr``."""
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if prefix in added or _only_added(cfg, prefix, added):
            return prefix
    return key


def _only_added(cfg, prefix: str, added: set[str]) -> bool:
    node = OmegaConf.select(cfg, prefix, throw_on_resolution_failure=False)
    if not OmegaConf.is_dict(node):
        return prefix in added
    children = [f"{prefix}.{k}" for k in node.keys()]
    return bool(children) and all(_only_added(cfg, child, added) for child in children)


def _check_added_keys(cfg, overrides: Iterable[str]) -> None:
    added = set(_added_keys(cfg, overrides))
    for key in sorted(added):
        unknown = _unknown_root(cfg, key, added)
        parent, _, name = unknown.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        siblings = [str(k) for k in node.keys()
                    if str(k) != name and not _only_added(cfg, f"{parent}.{k}".lstrip("."), added)]
        close = [f"{parent}.{c}".lstrip(".") for c in difflib.get_close_matches(name, siblings, n=3)]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        where = f"keys under {parent}" if parent else "top-level keys"
        raise ConfigError(f"{unknown} is not a known key{hint} ({where}: {', '.join(siblings)}). Fix the name, or "
                          f"use ++{key}=... to add a key on purpose")


def validate(cfg, overrides: Iterable[str] = ()) -> None:
    """Raise ConfigError on the first invalid value. ``overrides``: the command line's overrides (Hydra's
    ``overrides.task``), to reject a ``+key`` that adds a key no config defines (a typo)."""
    _check_added_keys(cfg, overrides)
    _require(cfg.stage in STAGES, f"stage={cfg.stage!r} is not known; allowed: {', '.join(STAGES)}")
    _require(cfg.task.name in TASKS, f"task.name={cfg.task.name!r} is not known; allowed: {', '.join(TASKS)}")
    if cfg.task.name in ("tldr", "hh"):
        from isdpo.data.text import validate_text_task

        try:
            validate_text_task(cfg.task, cfg.model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    backend = cfg.judge.backend
    _require(backend in ("none", "openai", "hf"), f"judge.backend={backend!r} is not known; allowed: none, openai, hf")
    _require(backend == "none" or cfg.task.name != "synthetic" or cfg.stage not in ("judge", "pipeline"),
             "judge.backend needs a text task (task=tldr|hh): the synthetic task has no text to judge")
    _require(cfg.stage != "judge" or backend != "none", "stage=judge needs judge=openai or judge=hf (judge.backend is none)")
    _require(_number(cfg, "beta") > 0, f"beta must be > 0 (got {cfg.beta})")
    for key in SEED_KEYS:
        _seed(cfg, key)
    try:
        build_loss(cfg.loss.base, cfg.beta, OmegaConf.to_container(cfg.loss.params, resolve=True),
                   OmegaConf.to_container(cfg.loss.importance_sampling, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(cfg.logger.name in LOGGERS, f"logger.name={cfg.logger.name!r} is not known; allowed: {', '.join(LOGGERS)}")
    if cfg.logger.name == "wandb":
        _require(cfg.logger.mode in WANDB_MODES,
                 f"logger.mode={cfg.logger.mode!r} is not known; allowed: {', '.join(WANDB_MODES)}")

    hw = cfg.hardware
    _require(hw.accelerator in ACCELERATORS,
             f"hardware.accelerator={hw.accelerator!r} is not known; allowed: {', '.join(ACCELERATORS)}")
    for key in ("devices", "num_nodes", "per_device_batch_size"):
        _require(_number(cfg, f"hardware.{key}") >= 1, f"hardware.{key} must be >= 1 (got {hw[key]})")
    _require(_number(cfg, "hardware.num_workers") >= 0, f"hardware.num_workers must be >= 0 (got {hw.num_workers})")

    tr, ev = cfg.task.train, cfg.task.eval
    _require(_number(cfg, "task.train.global_batch_size") >= 1,
             f"task.train.global_batch_size must be >= 1 (got {tr.global_batch_size})")
    try:
        accumulation(tr.global_batch_size, hw.per_device_batch_size, hw.devices, hw.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(_number(cfg, "task.train.group_batches") >= 1,
             f"task.train.group_batches must be >= 1 (got {tr.group_batches})")
    _require(not (tr.packing and cfg.model.get("attn_implementation") == "flash_attention_2"),
             "task.train.packing=true needs model.attn_implementation sdpa or eager (the packed block-diagonal "
             "mask cannot go through flash_attention_2)")
    _require(_number(cfg, "task.train.lr") > 0, f"task.train.lr must be > 0 (got {tr.lr})")
    _require(_number(cfg, "task.train.max_steps") >= 1, f"task.train.max_steps must be >= 1 (got {tr.max_steps})")
    _require(_number(cfg, "task.train.gradient_clip_val") >= 0,
             f"task.train.gradient_clip_val must be >= 0 (got {tr.gradient_clip_val})")
    _require(_number(cfg, "task.eval.temperature") > 0, f"task.eval.temperature must be > 0 (got {ev.temperature})")
    _require(0 < _number(cfg, "task.eval.top_p") <= 1, f"task.eval.top_p must be in (0, 1] (got {ev.top_p})")
    _require(_number(cfg, "task.eval.every_n_steps") >= 0,
             f"task.eval.every_n_steps must be >= 0 (got {ev.every_n_steps})")
    for key in ("n_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
        _require(_number(cfg, f"task.eval.{key}") >= 1, f"task.eval.{key} must be >= 1 (got {ev[key]})")

    model = cfg.model
    if model.pretrained and str(model.pretrained).startswith(("/", ".", "~")):
        path = Path(str(model.pretrained)).expanduser()
        _require(path.exists(), f"model.pretrained={model.pretrained!r}: no such file or directory")
        if model.gguf_file:
            _require((path / model.gguf_file).exists(),
                     f"model.gguf_file={model.gguf_file!r}: not found in {path}")
