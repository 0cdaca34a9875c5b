"""stage=pipeline: every stage in order: sft, the task's upstream stages (the golden RM and relabelling
of a text task), align, evaluate, and the LLM judge when one is configured."""
from __future__ import annotations

from isdpo.artifacts import EVALUATION
from isdpo.stages.align import run_align
from isdpo.stages.common import run_dir, task_of
from isdpo.stages.evaluate import run_evaluate
from isdpo.stages.judge import run_judge
from isdpo.stages.relabel import run_relabel
from isdpo.stages.reward import run_reward
from isdpo.stages.sft import run_sft

UPSTREAM = {"reward": run_reward, "relabel": run_relabel}


def run_pipeline(cfg, fast_dev_run: bool = False) -> dict:
    ref = run_sft(cfg, fast_dev_run=fast_dev_run)
    for stage in task_of(cfg).upstream_stages():
        UPSTREAM[stage](cfg, fast_dev_run=fast_dev_run)
    result = run_align(cfg, ref_dir=ref, fast_dev_run=fast_dev_run, save_evaluation=True)
    if result:  # empty on data-parallel ranks other than zero
        if not (run_dir(cfg) / EVALUATION).exists():  # align saved its final point unless it had none to save
            run_evaluate(cfg, ref_dir=ref)
        if cfg.judge.backend != "none":
            result["judge"] = run_judge(cfg, add_to_result=False)  # run_stage writes the result
    return result
