"""The experiment's stages, the top floor: each takes the composed config (an omegaconf DictConfig)
and reads and writes files under ``cfg.paths``; nothing here imports Hydra. One module per stage;
``STAGES`` maps ``stage=<name>`` to its function."""
from __future__ import annotations

import shutil
from typing import Any, Callable

import torch

from isdpo.artifacts import CHECKPOINT, RESULT, RUN_CONFIG, write_json
from isdpo.distributed import rank_world
from isdpo.host import reuse_freed_memory
from isdpo.run_guard import adopt_hydra_record, run_folder_lock
from isdpo.stages.align import run_align
from isdpo.stages.common import run_dir
from isdpo.stages.evaluate import run_evaluate
from isdpo.stages.judge import run_judge
from isdpo.stages.pipeline import run_pipeline
from isdpo.stages.relabel import run_relabel
from isdpo.stages.reward import run_reward
from isdpo.stages.sft import run_sft
from isdpo.timing import TIMER

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
    """Run ``cfg.stage`` holding the run folder's lock (one process per folder at a time). A completed run's
    result.json is written here, once, with the ``timing`` block (isdpo.timing: seconds per phase, start-up
    included)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not known; allowed: {', '.join(STAGES)}")
    if cfg.hardware.get("torch_threads"):
        torch.set_num_threads(int(cfg.hardware.torch_threads))
    if cfg.hardware.get("reuse_freed_memory"):
        reuse_freed_memory()
    TIMER.start_run()
    with run_folder_lock(run_dir(cfg)):
        # A new folder's; else the record waits for the config check of the run there (isdpo.run_guard.check_identity).
        if rank_world()[0] == 0 and not (run_dir(cfg) / RUN_CONFIG).exists():
            adopt_hydra_record(run_dir(cfg))
        result = STAGES[cfg.stage](cfg, fast_dev_run)
        timing = TIMER.end_run()
        if isinstance(result, dict) and result.get("status") == "completed":  # stage=align or pipeline, rank zero
            result.setdefault("timing", timing)  # a finished run's rerun (nothing trained) keeps the run's own
            write_json(run_dir(cfg) / RESULT, result)
            if not cfg.task.train.keep_checkpoints:  # only now: a crash before result.json resumes from them
                shutil.rmtree((run_dir(cfg) / CHECKPOINT).parent, ignore_errors=True)
    return result

