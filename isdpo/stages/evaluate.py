"""stage=evaluate: the golden win rate and KL of ``policy/`` (or of the reference when there is none yet); for a
task without a golden reward, the pair metrics on its held-out pairs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from isdpo.artifacts import EVALUATION, POLICY, SAMPLES, atomic_path, write_json
from isdpo.callbacks import PairEvaluator
from isdpo.losses import build_loss
from isdpo.recipe import preference_module
from isdpo.stages.common import load_policy, load_reference, plain, reference_path, run_dir, task_of
from isdpo.stages.sft import run_sft
from isdpo.timing import TIMER


@TIMER.phase("evaluation")
def run_evaluate(cfg, ref_dir: Path | None = None) -> dict:
    """Evaluate ``<output_dir>/policy`` (or the reference) once; writes evaluation.json and samples.jsonl."""
    if ref_dir is None:  # still None afterwards when the task's reference is model.pretrained (no SFT)
        ref_dir = run_sft(cfg)
    task = task_of(cfg)
    reference = load_reference(cfg, task, ref_dir)
    out = run_dir(cfg)
    policy_dir = str(out / POLICY) if (out / POLICY).exists() else reference_path(ref_dir)
    policy = load_policy(cfg, task, policy_dir, reference)
    if cfg.hardware.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # Lightning places the models during training; a standalone evaluation must do it itself.
        policy, reference = policy.cuda(), reference.cuda()
    evaluator = task.evaluator(reference, cfg.task.eval)
    if evaluator is None:  # no golden reward: the training loss's metrics on the held-out pairs
        pairs = task.eval_pairs(reference, cfg.task.eval)
        if not pairs:
            raise ValueError(f"task={cfg.task.name} has no golden reward and task.eval.n_pairs=0: nothing to evaluate")
        tr = cfg.task.train
        loss_fn = build_loss(cfg.loss.base, cfg.beta, plain(cfg.loss.params), plain(cfg.loss.importance_sampling))
        module = preference_module(policy, reference, loss_fn, lr=tr.lr, response_only=tr.response_only_logits,
                                   concatenated=tr.concatenated_forward)
        res = PairEvaluator(pairs, pad_id=task.pad_id, batch_size=cfg.hardware.per_device_batch_size)(module)
    else:
        res = evaluator(policy)
    return write_evaluation(out, res, policy_dir or str(cfg.model.pretrained))


def write_evaluation(out: Path, res: dict, policy: str) -> dict:
    """evaluation.json (``res`` and the evaluated ``policy``) and, when ``res`` holds them, samples.jsonl; returns
    ``res`` without the samples. stage=pipeline writes align's final evaluation point here. Each file is written whole
    or not at all, evaluation.json last."""
    res = dict(res)
    if "samples" in res:
        prompts, responses, scores = res.pop("samples")
        with atomic_path(out / SAMPLES) as tmp, tmp.open("w") as fh:
            for p, r, s in zip(prompts, responses, scores.tolist()):
                fh.write(json.dumps({"prompt_ids": p, "response_ids": r, "golden_reward": s}) + "\n")
    res["policy"] = policy
    write_json(out / EVALUATION, res)
    return res
