"""What a task gives the stages, and the registry of tasks (``conf/task/<name>.yaml`` -> a class here).

A new task is one module that defines a class with this interface, decorated with ``@register("name")``
and imported in ``isdpo/tasks/__init__.py``, a YAML file in ``conf/task/`` and the schema it extends
(docs/architecture.md, "Where to add").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from isdpo.evaluate import Evaluator


class Task(Protocol):
    """A task as the stages see it; built by :func:`build_task` from the ``task`` and ``model`` blocks."""

    pad_id: int
    eos_id: int | None
    vocab_size: int | None  # a randomly initialised model's vocabulary; None: the checkpoint's own
    tokenizer: Any  # saved beside every model a stage writes; None for token-level tasks

    def upstream_stages(self) -> Sequence[str]:
        """Stages ``stage=pipeline`` runs between SFT and align (e.g. the golden RM and relabelling)."""

    def reference_source(self) -> str:
        """"sft": the reference (and the policy's start) is stage=sft's model; "pretrained": ``model.pretrained``
        itself, and no SFT stage runs."""

    def sft_key(self) -> dict:
        """What the SFT reference depends on, besides the model and the sft block (cache key)."""

    def sft_examples(self) -> list[dict]:
        """``{"prompt_ids", "response_ids"}`` examples of the SFT set."""

    def preference_examples(self, reference, reference_dir: Path | None, precision: str | None = None) -> list[dict]:
        """``{"prompt_ids", "chosen_ids", "rejected_ids"[, *_ref_logp, *_behavior_logp]}`` pairs;
        ``reference_dir`` is None when the reference is ``model.pretrained``; ``precision`` (hardware.precision):
        the precomputed reference log-probs' (isdpo.ref_cache.add_reference_logps), None = float32."""

    def eval_pairs(self, reference, eval_cfg: Mapping[str, Any]) -> list[dict]:
        """``eval_cfg.n_pairs`` held-out pairs (as ``preference_examples``) for the pair metrics; [] = none."""

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """The golden reward of token-id (prompt, response) pairs."""

    def evaluator(self, reference, eval_cfg: Mapping[str, Any]) -> Evaluator | None:
        """The over-optimization curve's evaluator (held-out prompts, their reference completions); None when
        the task has no golden reward (its curve is then the pair metrics alone)."""


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register(*names: str) -> Callable[[TaskFactory], TaskFactory]:
    """Class decorator: the task is selected by ``task.name`` in ``names``."""

    def add(cls: TaskFactory) -> TaskFactory:
        for name in names:
            if name in TASKS:
                raise ValueError(f"task {name!r} is registered twice")
            TASKS[name] = cls
        return cls

    return add


def build_task(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], cache_dir: str | Path,
               output_dir: str | Path | None = None) -> Task:
    name = task_cfg["name"]
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not known; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name](task_cfg, model_cfg, cache_dir, output_dir)
