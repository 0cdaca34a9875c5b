"""The experiment's stages, the top floor: each takes the composed config (an omegaconf DictConfig)
and reads and writes files under ``cfg.paths``; nothing here imports Hydra. One module per stage;
``STAGES`` maps ``stage=<name>`` to its function."""
from __future__ import annotations

from typing import Any, Callable

import torch

from isdpo.run_guard import run_folder_lock
from isdpo.stages.align import run_align
from isdpo.stages.common import run_dir
from isdpo.stages.evaluate import run_evaluate
from isdpo.stages.judge import run_judge
from isdpo.stages.pipeline import run_pipeline
from isdpo.stages.relabel import run_relabel
from isdpo.stages.reward import run_reward
from isdpo.stages.sft import run_sft

STAGES: dict[str, Callable[..., Any]] = {
    "sft": lambda cfg, fast_dev_run: run_sft(cfg, fast_dev_run=fast_dev_run),
    "reward": lambda cfg, fast_dev_run: run_reward(cfg, fast_dev_run=fast_dev_run),
    "relabel": lambda cfg, fast_dev_run: run_relabel(cfg, fast_dev_run=fast_dev_run),
    "align": lambda cfg, fast_dev_run: run_align(cfg, fast_dev_run=fast_dev_run),
    "evaluate": lambda cfg, fast_dev_run: run_evaluate(cfg),
    "judge": lambda cfg, fast_dev_run: run_judge(cfg),
    "pipeline": lambda cfg, fast_dev_run: run_pipeline(cfg, fast_dev_run=fast_dev_run),
}


def run_stage(cfg, fast_dev_run: bool = False) -> Any:
    """Run ``cfg.stage`` holding the run folder's lock (one process per folder at a time)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not known; allowed: {', '.join(STAGES)}")
    if cfg.hardware.get("torch_threads"):
        torch.set_num_threads(int(cfg.hardware.torch_threads))
    with run_folder_lock(run_dir(cfg)):
        return STAGES[cfg.stage](cfg, fast_dev_run)
