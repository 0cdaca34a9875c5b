"""Online DPO (loss.online, isdpo/online.py): its expected gradient through the trainer's batch path, exactly by
enumeration on a tiny model; IS-DPO without clip on reference pairs has the same expected gradient (IS-DAA paper,
arXiv 2506.08681, Theorem 1); a Monte-Carlo check of the real sampling and labelling; the stage, resume, config."""
from __future__ import annotations

import copy
import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from isdpo.config import ConfigError, validate
from isdpo.losses import build_loss
from isdpo.online import OnlinePairs, PromptCollator
from isdpo.recipe import pair_collator, preference_module
from isdpo.stages import run_stage
from tests.hydra_utils import SMALL, compose_cfg

V, PAD, BETA = 3, 0, 0.5
PROMPT = [1, 2]
# Every response of length 2 over the model's whole vocabulary: the policy can sample nothing else.
RESPONSES = [list(y) for y in itertools.product(range(V), repeat=2)]
N_RESP = len(RESPONSES)
REWARD = torch.tensor([0.3, -1.2, 2.0, 0.0, 1.1, -0.4, 0.8, -2.0, 1.5], dtype=torch.float64)
HAND = {  # the base losses written out by hand (independently of isdpo.losses), as functions of rho
    "dpo": lambda rho: -F.logsigmoid(BETA * rho),
    "ipo": lambda rho: (rho - 1 / (2 * BETA)) ** 2,
}


def score(prompts, responses):
    """The golden reward table of the enumerable case (the prompt is always PROMPT)."""
    return torch.stack([REWARD[RESPONSES.index(list(r))] for r in responses])


def models():
    """(policy, reference): a tiny Llama, and the policy moved away from it (pi_theta != pi_ref)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, initializer_range=0.5)
    reference = LlamaForCausalLM(cfg).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy, reference


def module(policy, reference, base="dpo", importance_sampling=None, online=None):
    loss_fn = build_loss(base, BETA, {}, importance_sampling)
    return preference_module(policy, reference, loss_fn, lr=1e-3, online=online)


def seq_logps(model):
    """log pi(y|PROMPT) of every response, straight from the model's logits: [N_RESP]."""
    ids = torch.tensor([PROMPT + y for y in RESPONSES])
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    n = len(PROMPT)
    return sum(logp[:, n - 1 + t].gather(1, ids[:, n + t, None]).squeeze(1) for t in range(2))


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def draws_and_labels(pi):
    """Every ordered draw (a, b) of two responses with probability pi(a) pi(b) and both label outcomes:
    (chosen, rejected, probability of draw and outcome)."""
    bt = torch.sigmoid(REWARD[:, None] - REWARD[None, :])  # bt[a, b] = P(a beats b)
    out = []
    for a, b in itertools.product(range(N_RESP), repeat=2):
        out.append((a, b, pi[a] * pi[b] * bt[a, b]))
        out.append((b, a, pi[a] * pi[b] * bt[b, a]))
    return out


def expected_gradient_by_hand(policy, reference, base):
    """(a): the gradient of sum over draws and labels of P x f(beta, rho), pi detached, by autograd."""
    policy.zero_grad()
    lp = seq_logps(policy)
    with torch.no_grad():
        lr = seq_logps(reference)
    pi = lp.detach().double().exp()
    total = sum(p * HAND[base]((lp[w] - lr[w]) - (lp[l] - lr[l])) for w, l, p in draws_and_labels(pi))
    total.backward()
    return grads(policy), pi, lr.double().exp()


def batch_path_gradient(mod, policy, weighted_pairs):
    """The gradient of sum_i weight_i x (per-pair loss of the module's batch path: collator, pair_logps, loss_fn)."""
    policy.zero_grad()
    pairs = [{"prompt_ids": PROMPT, "chosen_ids": RESPONSES[w], "rejected_ids": RESPONSES[l]}
             for w, l, _ in weighted_pairs]
    weights = torch.tensor([float(p) for _, _, p in weighted_pairs])
    out = mod.loss_fn(mod.pair_logps(pair_collator(PAD)(pairs)))
    (weights * out.losses).sum().backward()
    return grads(policy)


@pytest.mark.parametrize("base", ["dpo", "ipo"])
def test_online_gradient_through_the_batch_path_is_the_exact_expected_gradient(base):
    """(a) == (b): every labelled pair fed through the module's batch path, weighted by its probability."""
    policy, reference = models()
    exact, pi, _ = expected_gradient_by_hand(policy, reference, base)
    assert (pi - 1 / N_RESP).abs().max() > 0.05  # a policy far from uniform: the weights matter
    via_batch = batch_path_gradient(module(policy, reference, base), policy, draws_and_labels(pi))
    scale = float(exact.abs().max())
    assert scale > 1e-2
    # float32 log-probs in the batch path: agreement to 1e-5 of the gradient's scale
    torch.testing.assert_close(via_batch, exact.float(), rtol=1e-5, atol=1e-5 * scale)


def test_is_dpo_without_clip_on_reference_pairs_has_the_online_dpo_gradient():
    """(c) Theorem 1: pairs drawn from pi_ref x pi_ref, weighted by IS-DPO's unclipped weight, give online DPO's
    expected gradient; plain DPO on the same pairs does not."""
    policy, reference = models()
    exact, pi, ref = expected_gradient_by_hand(policy, reference, "dpo")
    assert (pi - ref).abs().max() > 0.05  # pi_theta != pi_ref, so the weight is not 1
    is_mod = module(policy, reference, "dpo", {"enabled": True, "log_clip": None})
    offline = draws_and_labels(ref)
    torch.testing.assert_close(batch_path_gradient(is_mod, policy, offline), exact.float(), rtol=1e-5,
                               atol=1e-5 * float(exact.abs().max()))
    plain = batch_path_gradient(module(policy, reference, "dpo"), policy, offline)
    assert (plain - exact.float()).abs().max() > 1e-2


def test_online_batch_builder_samples_the_policy_and_labels_by_bradley_terry():
    """(d) The real sampling and labelling code (a training step's batch of 20k copies of the prompt): the batch's
    mean gradient matches the exact one within 4.5 standard errors in every coordinate, and on average within
    ~1 (mean z^2); sampling the reference or reversing the labels would be far outside (z^2 >> 1)."""
    n = 20_000
    policy, reference = models()
    exact, pi, ref = expected_gradient_by_hand(policy, reference, "dpo")
    exact = exact.double()
    online = OnlinePairs(score, pair_collator(PAD), pad_id=PAD, eos_id=None, max_new_tokens=2, seed=3)
    mod = module(policy, reference, "dpo", online=online)
    policy.train()
    rng = torch.get_rng_state()
    policy.zero_grad()
    with warnings.catch_warnings():  # self.log outside a Trainer
        warnings.simplefilter("ignore")
        loss = mod.training_step({"prompt_ids": [PROMPT] * n}, 0)
    assert policy.training  # sampling's eval mode is undone
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is not touched
    loss.backward()
    mc = grads(policy).double()

    # Per-outcome gradients g[(w, l)] of the DPO loss, and the exact outcome probabilities: the covariance.
    outcomes = list(itertools.product(range(N_RESP), repeat=2))
    policy.zero_grad()
    pairs = [{"prompt_ids": PROMPT, "chosen_ids": RESPONSES[w], "rejected_ids": RESPONSES[l]} for w, l in outcomes]
    losses = mod.loss_fn(mod.pair_logps(pair_collator(PAD)(pairs))).losses
    g = torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(
        losses[i], list(policy.parameters()), retain_graph=True)]) for i in range(len(outcomes))]).double()

    def outcome_probs(q, reverse=False):
        p = torch.zeros(len(outcomes), dtype=torch.float64)
        for w, l, prob in draws_and_labels(q):
            p[outcomes.index((l, w) if reverse else (w, l))] += prob
        return p

    p = outcome_probs(pi)
    torch.testing.assert_close(p @ g, exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))  # the covariance's mean is the exact gradient
    se = ((p @ g.square() - (p @ g).square()).clamp(min=0) / n).sqrt()
    keep = se > 1e-9  # coordinates with no variance (and no gradient) tell nothing

    def z(estimate):
        return (estimate - exact)[keep] / se[keep]

    assert keep.sum() > 100
    assert z(mc).abs().max() < 4.5, z(mc).abs().max()
    assert z(mc).square().mean() < 1.5, z(mc).square().mean()
    for wrong in (outcome_probs(ref), outcome_probs(pi, reverse=True)):
        assert z(wrong @ g).square().mean() > 25  # a wrong sampler or labeller fails the checks above


def test_online_pairs_depend_only_on_seed_step_and_prompts():
    policy, _ = models()
    online = OnlinePairs(score, PromptCollator(), pad_id=PAD, eos_id=None, max_new_tokens=2, seed=0)
    prompts = [PROMPT] * 64
    a = online.pairs(policy, prompts, step=5)
    torch.manual_seed(123)  # the global state plays no part
    assert online.pairs(policy, prompts, step=5) == a
    assert online.pairs(policy, prompts, step=6) != a
    assert OnlinePairs(score, PromptCollator(), pad_id=PAD, eos_id=None, max_new_tokens=2,
                       seed=1).pairs(policy, prompts, step=5) != a
    assert all(len(p["chosen_ids"]) == len(p["rejected_ids"]) == 2 for p in a)


def test_online_step_with_eos_gives_responses_of_several_lengths():
    """Text tasks stop responses at EOS: the pairs are cut after it and the step trains on them."""
    policy, reference = models()
    online = OnlinePairs(score_any, pair_collator(PAD), pad_id=PAD, eos_id=2, max_new_tokens=4, seed=0)
    pairs = online.pairs(policy, [PROMPT] * 64, step=0)
    lengths = {len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")}
    assert len(lengths) > 1 and max(lengths) <= 4
    assert all(2 not in p[k][:-1] for p in pairs for k in ("chosen_ids", "rejected_ids"))
    with warnings.catch_warnings():  # self.log outside a Trainer
        warnings.simplefilter("ignore")
        loss = module(policy, reference, online=online).training_step({"prompt_ids": [PROMPT] * 8}, 0)
    loss.backward()
    assert torch.isfinite(loss) and grads(policy).abs().sum() > 0


def score_any(prompts, responses):
    """A golden reward of responses of any length: the number of 1s."""
    return torch.tensor([float(sum(t == 1 for t in r)) for r in responses])


# ---- the stage: a short run, resume, config ----------------------------------------------------------------------

COMMON = SMALL + ["stage=align", "task.train.max_steps=4", "task.eval.every_n_steps=2",
                  "task.train.checkpoint_every_n_steps=2"]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Online DPO 4 steps straight; the same stopped after step 3 (checkpoint at 2) and resumed; offline DPO."""
    import lightning as L

    from isdpo.stages import align as stages

    tmp = tmp_path_factory.mktemp("online")
    cache = str(tmp / "cache")

    def run(name, overrides, callbacks=()):
        cfg = compose_cfg(COMMON + overrides, tmp / name)
        cfg.paths.cache_dir = cache
        validate(cfg)
        real = stages.build_trainer
        stages.build_trainer = lambda *a, **k: real(*a, **{**k, "callbacks": k["callbacks"] + list(callbacks)})
        try:
            return run_stage(cfg)
        finally:
            stages.build_trainer = real

    class CrashAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise Crash()

    straight = run("straight", ["loss=online_dpo"])
    with pytest.raises(Crash):
        run("resumed", ["loss=online_dpo"], [CrashAt()])
    resumed = run("resumed", ["loss=online_dpo"])
    offline = run("offline", ["loss=dpo"])
    return tmp, straight, resumed, offline


def rows(tmp, name):
    return [json.loads(x) for x in (tmp / name / "run" / "metrics.jsonl").read_text().splitlines()]


def weights(tmp, name):
    return torch.load(tmp / name / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_online_align_run_finishes_and_differs_from_offline(runs):
    tmp, straight, _, offline = runs
    assert straight["loss"] == "online_dpo" and straight["final"]["step"] == 4
    a, b = rows(tmp, "straight"), rows(tmp, "offline")
    assert [r["step"] for r in a] == [0, 2, 4] == [r["step"] for r in b]
    assert a[0]["win_rate"] == b[0]["win_rate"]  # the same start
    wa, wb = weights(tmp, "straight"), weights(tmp, "offline")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # it trained on other pairs
    assert a[-1]["kl"] != b[-1]["kl"]


def test_online_resume_equals_an_uninterrupted_run(runs):
    tmp, straight, resumed, _ = runs
    assert [r["step"] for r in rows(tmp, "resumed")] == [r["step"] for r in rows(tmp, "straight")]
    for ra, rb in zip(rows(tmp, "straight"), rows(tmp, "resumed")):
        for key in ("win_rate", "kl", "golden_reward"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa, wb = weights(tmp, "straight"), weights(tmp, "resumed")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    (["loss=online_dpo", "loss.importance_sampling.enabled=true"],
     r"loss.online=true with loss.importance_sampling.enabled=true: on-policy samples have importance weight 1"),
    (["loss=isdpo", "loss.online=true"], r"loss.online=true with loss.importance_sampling.enabled=true"),
    (["loss=online_dpo", "hardware=cpu_fsdp2"], r"loss.online=true with hardware.strategy=fsdp is not supported"),
    (["loss=online_dpo", "task=preference", "model=llama32_3b"],
     r"loss.online=true needs a golden reward to label the policy's samples: task=preference has none"),
])
def test_online_config_refusals(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(overrides, tmp_path))


def test_online_config_composes(tmp_path):
    cfg = compose_cfg(["loss=online_dpo"], tmp_path)
    validate(cfg)
    assert (cfg.loss.name, cfg.loss.base, cfg.loss.online, cfg.loss.importance_sampling.enabled) == (
        "online_dpo", "dpo", True, False)
    cfg = compose_cfg(["loss=ipo", "loss.online=true"], tmp_path)
    validate(cfg)
    assert (cfg.loss.base, cfg.loss.online) == ("ipo", True)
    assert compose_cfg(["loss=dpo"], tmp_path).loss.online is False
