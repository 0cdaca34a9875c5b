"""The synthetic testbed's evaluation is held out and its importance sampling uses the true behaviour policy:
training never sees an evaluation prompt; pairs sampled away from temperature 1 carry mu's log-probs, so IS
weights at step 0 are pi_ref / mu; the evaluation's two prompt halves are independent estimates."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from isdpo.data.collate import PreferenceCollator
from isdpo.data.synthetic import SyntheticTask
from isdpo.losses import build_loss
from isdpo.module import PreferenceModule
from isdpo.tasks.synthetic import SyntheticRuntime
from tests.hydra_utils import compose_cfg

IS = {"enabled": True, "log_clip": None, "weight": "sequence", "lower_log_clip": None, "self_normalize": False}


def runtime(tmp_path, *overrides):
    cfg = compose_cfg(["task.n_pref_prompts=200", "task.eval.n_prompts=300", "task.eval.n_pairs=64", *overrides],
                      tmp_path)
    task_cfg = {**cfg.task, "sft": dict(cfg.task.sft), "train": dict(cfg.task.train), "eval": dict(cfg.task.eval)}
    return SyntheticRuntime(task_cfg, None, tmp_path / "cache"), cfg


def reference_lm(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def chain_part(prompts) -> set[tuple[int, ...]]:
    return {tuple(p[1:]) for p in prompts}  # without BOS


def test_heldout_partition_is_a_fixed_share_of_the_prompt_space():
    task = SyntheticTask(seed=3, heldout_fraction=0.25)
    space = torch.cartesian_prod(*[torch.arange(task.n_states)] * task.prompt_length)  # every token string
    share = task.heldout(space).float().mean().item()
    assert share == pytest.approx(0.25, abs=0.01)
    assert torch.equal(task.heldout(space), SyntheticTask(seed=3, heldout_fraction=0.25).heldout(space))
    assert not torch.equal(task.heldout(space), SyntheticTask(seed=4, heldout_fraction=0.25).heldout(space))
    assert not SyntheticTask(seed=3, heldout_fraction=0.0).heldout(space).any()


def test_training_never_sees_an_evaluation_prompt(tmp_path):
    rt, cfg = runtime(tmp_path)
    reference = reference_lm(rt.vocab_size)
    train_pairs = rt.preference_examples(reference, tmp_path / "ref0")
    sft_starts = {tuple(e["response_ids"][: rt.task.prompt_length]) for e in rt.sft_examples()}
    trained = chain_part(p["prompt_ids"] for p in train_pairs) | sft_starts
    evaluated = chain_part(rt.evaluator(reference, dict(cfg.task.eval)).prompts)
    heldout_pairs = chain_part(p["prompt_ids"] for p in rt.eval_pairs(reference, dict(cfg.task.eval)))
    assert len(evaluated) > 50 and len(heldout_pairs) > 20 and len(trained) > 300
    assert not trained & evaluated
    assert not trained & heldout_pairs
    # Without the split (the old behaviour) most evaluation prompts were also training prompts.
    rt0, _ = runtime(tmp_path / "nosplit", "task.heldout_prompt_fraction=0")
    old = chain_part(rt0.evaluator(reference, dict(cfg.task.eval)).prompts)
    assert len(old & chain_part(p["prompt_ids"] for p in rt0.preference_examples(reference, tmp_path / "ref0"))) > 0


def by_hand_logps(model, pair, temperature: float) -> tuple[float, float]:
    """log p(chosen|x), log p(rejected|x) of the model's temperature-scaled distribution, token by token."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([pair["prompt_ids"] + pair[side]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)
        n = len(pair["prompt_ids"])
        out.append(sum(logp[n - 1 + t, tok].item() for t, tok in enumerate(pair[side])))
    return out[0], out[1]


def test_tempered_pairs_carry_mu_and_step0_weights_are_pi_ref_over_mu(tmp_path):
    rt, _ = runtime(tmp_path, "task.pref_temperature=0.7")
    reference = reference_lm(rt.vocab_size)
    pairs = rt.preference_examples(reference, tmp_path / "ref0")[:16]
    expected_log_w = []
    for p in pairs:
        mu_w, mu_l = by_hand_logps(reference, p, 0.7)
        ref_w, ref_l = by_hand_logps(reference, p, 1.0)
        assert p["chosen_behavior_logp"] == pytest.approx(mu_w, abs=1e-4)
        assert p["rejected_behavior_logp"] == pytest.approx(mu_l, abs=1e-4)
        expected_log_w.append((ref_w - mu_w) + (ref_l - mu_l))
    # Step 0 through the trainer's batch path: the policy is the reference, so w = pi_ref / mu (not 1).
    policy = copy.deepcopy(reference).train()
    module = PreferenceModule(policy, reference, build_loss("dpo", 0.01, importance_sampling=IS), lr=1e-3)
    out = module.loss_fn(module.pair_logps(PreferenceCollator(rt.pad_id)(pairs)))
    assert torch.allclose(out.weights.double().log(), torch.tensor(expected_log_w, dtype=torch.float64), atol=1e-3)
    assert (out.weights - 1).abs().max() > 0.05  # mu != pi_ref here: weights of 1 would be the old bug


def test_pairs_at_temperature_one_are_pi_ref_samples_without_behaviour_columns(tmp_path):
    rt, _ = runtime(tmp_path)
    pairs = rt.preference_examples(reference_lm(rt.vocab_size), tmp_path / "ref0")
    assert "chosen_behavior_logp" not in pairs[0]  # mu = pi_ref: IS divides by the reference's own log-probs


def test_evaluation_halves_are_disjoint_prompt_sets_that_average_to_the_whole(tmp_path):
    rt, cfg = runtime(tmp_path)
    reference = reference_lm(rt.vocab_size)
    ev = rt.evaluator(reference, {**cfg.task.eval, "n_prompts": 300, "batch_size": 300})
    res = ev(copy.deepcopy(reference))
    assert res["win_rate"] == pytest.approx((res["win_rate_a"] + res["win_rate_b"]) / 2, abs=1e-6)
    assert res["golden_reward"] == pytest.approx((res["golden_reward_a"] + res["golden_reward_b"]) / 2, abs=1e-5)
    assert res["win_rate_a"] != res["win_rate_b"]  # different prompts and samples
