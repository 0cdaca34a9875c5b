"""Non-finite training stops loudly: at the first non-finite loss or gradient norm, before the optimizer
step applies it, with a message that says what went wrong and what to do; no checkpoint with NaN weights."""
import copy
import os
import random
import subprocess
import sys

import lightning as L
import pytest
import torch

from isdpo.callbacks import EvalCallback
from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.losses import build_loss
from isdpo.module import NonFiniteError, PreferenceModule, SFTModule
from isdpo.trainer import AtomicCheckpointIO, build_trainer
from tests.hydra_utils import ROOT, SMALL

HW = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "strategy": "auto"}
IS = {"enabled": True, "log_clip": 0.0, "weight": "sequence", "lower_log_clip": None, "self_normalize": False}


def pairs(n=16, seed=0, vocab=23):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": tok(3), "chosen_ids": tok(4), "rejected_ids": tok(4)} for _ in range(n)]


def policy_and_reference(tiny_lm):
    reference = copy.deepcopy(tiny_lm).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return tiny_lm.train(), reference


def finite_state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state, path
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_huge_lr_stops_at_the_first_nonfinite_loss_without_a_nan_checkpoint(tiny_lm, tmp_path):
    policy, reference = policy_and_reference(tiny_lm)
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.1, importance_sampling=IS), lr=1e30,
                              schedule="constant")
    loader = torch.utils.data.DataLoader(pairs(), batch_size=2, collate_fn=PreferenceCollator(0))
    trainer = build_trainer(HW, max_steps=4, accumulate=2, run_dir=tmp_path, logger=False, callbacks=[],
                            checkpoint_every_n_steps=1, progress=False)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(module, loader)
    msg = str(err.value)
    # Step 1 is finite (the reference's log-probs); its update makes the weights ~1e30, so step 2's loss is not.
    assert trainer.global_step == 1
    for part in ("optimizer step 2", "lr=1e+30", "loss=nan", "grad norm=nan", "policy chosen/rejected",
                 "reference chosen/rejected", "is/weight_raw_max", "is/ess_frac", "task.train.lr",
                 "task.train.gradient_clip_val", "not applied"):
        assert part in msg, (part, msg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and finite_state(ckpt)  # step 1's checkpoint; none after it
    assert all(torch.isfinite(p).all() for p in policy.parameters())  # the NaN step was not applied


def test_a_nan_in_one_micro_batch_stops_the_step_and_names_the_micro_batch(tiny_lm, tmp_path):
    policy, reference = policy_and_reference(tiny_lm)
    data = pairs(8)
    for i, e in enumerate(data):  # precomputed reference log-probs, NaN in the 2nd micro-batch of step 1
        e["chosen_ref_logp"], e["rejected_ref_logp"] = -10.0, float("nan") if i == 2 else -11.0
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    module = PreferenceModule(policy, None, build_loss("dpo", 0.1), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=PreferenceCollator(0))
    trainer = build_trainer(HW, max_steps=2, accumulate=2, run_dir=tmp_path, logger=False, callbacks=[],
                            progress=False)
    with pytest.raises(NonFiniteError, match=r"optimizer step 1 .*micro-batch 2 of 2"):
        trainer.fit(module, loader)
    assert trainer.global_step == 0
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sft_stops_too_and_names_its_own_config_block(tiny_lm, tmp_path):
    rng = random.Random(0)
    data = [{"prompt_ids": [1, 2], "response_ids": [rng.randrange(1, 23) for _ in range(5)]} for _ in range(8)]
    module = SFTModule(tiny_lm.train(), lr=1e30, schedule="constant")
    trainer = build_trainer(HW, max_steps=-1, max_epochs=1, accumulate=1, run_dir=tmp_path, logger=False,
                            callbacks=[], progress=False)
    with pytest.raises(NonFiniteError, match=r"(?s)optimizer step 2 of 4 .*lower task\.sft\.lr") as err:
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2, collate_fn=SFTCollator(0)))
    assert "gradient_clip_val" not in str(err.value)  # SFT has no such setting


def test_atomic_checkpoint_io_refuses_nonfinite_parameters(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"policy.w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()
    bad = {"state_dict": {"policy.w": torch.tensor([1.0, float("inf"), 2.0])}, "global_step": 2}
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*last\.ckpt.*non-finite.*policy\.w"):
        io.save_checkpoint(bad, path)
    assert path.read_bytes() == good  # the previous checkpoint is kept
    assert not (tmp_path / "last.ckpt.tmp").exists()


def test_module_refuses_to_checkpoint_nonfinite_parameters(tiny_lm, tmp_path):
    """Every data-parallel rank runs on_save_checkpoint, so every rank stops (none waits on a dead one)."""
    policy, reference = policy_and_reference(tiny_lm)
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.1), lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(pairs(2), batch_size=2, collate_fn=PreferenceCollator(0))
    trainer.fit(module, loader)
    with torch.no_grad():
        policy.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"policy\.lm_head\.weight"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_launch_align_with_a_huge_lr_exits_nonzero_with_the_message(tmp_path):
    overrides = [o for o in SMALL if not o.startswith("task.eval.every_n_steps")] + [
        "stage=align", "task.train.lr=1e30", "task.train.gradient_clip_val=0", "task.eval.every_n_steps=0",
        "task.train.checkpoint_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *overrides], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # One message, no traceback (launch.py prints user-fixable errors alone; ISDPO_TRACEBACK=1 shows the rest).
    assert "[isdpo] error:" in out and "non-finite" in out and "task.train.lr" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "multinomial" not in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert not ckpt.exists() or finite_state(ckpt)
    assert not (tmp_path / "run" / "policy").exists()


def test_an_evaluation_of_a_diverged_policy_says_so(tiny_lm, tmp_path):
    """Not torch.multinomial's bare "probability tensor contains either inf, nan or element < 0"."""
    policy, reference = policy_and_reference(tiny_lm)

    def evaluator(model):  # samples like the real evaluators do
        with torch.no_grad():
            probs = model(torch.tensor([[1, 2, 3]])).logits[:, -1].softmax(-1)
        torch.multinomial(probs, 1)
        return {"win_rate": 0.5}

    class Diverge(L.Callback):  # runs before the evaluation of step 1
        def on_train_batch_end(self, trainer, pl_module, *args):
            with torch.no_grad():
                pl_module.policy.lm_head.weight[0, 0] = float("inf")

    module = PreferenceModule(policy, reference, build_loss("dpo", 0.1), lr=1e-3)
    loader = torch.utils.data.DataLoader(pairs(4), batch_size=2, collate_fn=PreferenceCollator(0))
    trainer = build_trainer(HW, max_steps=2, accumulate=1, run_dir=tmp_path, logger=False, progress=False,
                            callbacks=[Diverge(), EvalCallback(evaluator, tmp_path / "metrics.jsonl", 1)])
    with pytest.raises(NonFiniteError, match=r"evaluation at step 1: .*lm_head\.weight.*task\.train\.lr"):
        trainer.fit(module, loader)


DDP_SCRIPT = """
import copy, random, sys
import lightning as L, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from isdpo.data.collate import PreferenceCollator, SFTCollator
from isdpo.losses import build_loss
from isdpo.module import PreferenceModule
from isdpo.trainer import build_trainer


class RankZeroFails(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2 and trainer.global_rank == 0:
            raise RuntimeError("only rank zero fails")


if __name__ == "__main__":
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2))
    rng = random.Random(0)
    data = [{"prompt_ids": [1, 2], "chosen_ids": [rng.randrange(1, 23) for _ in range(3)], "rejected_ids": [3, 4],
             "chosen_ref_logp": -9.0, "rejected_ref_logp": -9.0} for _ in range(32)]
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    if sys.argv[1] == "nan":  # a NaN in rank 1's batch of step 2 only
        data[5]["rejected_ref_logp"] = float("nan")
    shard = data[rank::2]
    loader = torch.utils.data.DataLoader(shard, batch_size=2, collate_fn=PreferenceCollator(0))
    hw = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "precision": "32-true", "strategy": "ddp"}
    callbacks = [RankZeroFails()] if sys.argv[1] == "rank0" else []
    trainer = build_trainer(hw, max_steps=4, accumulate=1, run_dir=Path("."), logger=False, callbacks=callbacks,
                            progress=False)
    trainer.fit(PreferenceModule(policy, None, build_loss("dpo", 0.1), lr=1e-3), loader)
"""


@pytest.mark.parametrize("mode", ["nan", "rank0"])
def test_ddp_ranks_stop_together(mode, tmp_path):
    """A NaN on one rank stops both at the same step; a rank that fails alone takes the other down with it."""
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), mode], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    if mode == "nan":
        assert "non-finite training at optimizer step 2 of 4 on rank 0" in out, out[-3000:]
        assert "another data-parallel rank had a non-finite loss" in out, out[-3000:]
    else:
        assert "only rank zero fails" in out, out[-3000:]
        assert "[rank1]" not in out, out[-3000:]  # killed at once, not by its own error
