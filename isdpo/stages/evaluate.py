"""stage=evaluate: the golden win rate and KL of ``policy/`` (or of the reference when there is none yet)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from isdpo.artifacts import EVALUATION, POLICY, SAMPLES
from isdpo.models import load_causal_lm
from isdpo.stages.common import load_reference, run_dir, task_of
from isdpo.stages.sft import run_sft


def run_evaluate(cfg, ref_dir: Path | None = None) -> dict:
    """Evaluate ``<output_dir>/policy`` (or the reference) once; writes evaluation.json and samples.jsonl."""
    ref_dir = ref_dir or run_sft(cfg)
    task = task_of(cfg)
    reference = load_reference(cfg, task, ref_dir)
    out = run_dir(cfg)
    policy_dir = out / POLICY if (out / POLICY).exists() else ref_dir / "model"
    policy = load_causal_lm(cfg.model, vocab_size=task.vocab_size, path=str(policy_dir))
    if cfg.hardware.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # Lightning places the models during training; a standalone evaluation must do it itself.
        policy, reference = policy.cuda(), reference.cuda()
    res = task.evaluator(reference, cfg.task.eval)(policy)
    prompts, responses, scores = res.pop("samples")
    with (out / SAMPLES).open("w") as fh:
        for p, r, s in zip(prompts, responses, scores.tolist()):
            fh.write(json.dumps({"prompt_ids": p, "response_ids": r, "golden_reward": s}) + "\n")
    res["policy"] = str(policy_dir)
    (out / EVALUATION).write_text(json.dumps(res, indent=2))
    return res
