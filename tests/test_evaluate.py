"""Evaluation pieces: k3 KL estimator, win rate, sampling, the synthetic golden reward."""
import math

import torch

from isdpo.data.synthetic import SyntheticTask
from isdpo.evaluate import k3_kl, win_rate
from isdpo.sampling import sample_responses


def test_k3_is_unbiased_for_categorical_kl():
    """For pi = softmax(a), ref = softmax(b) over 6 outcomes: E_{y~pi}[k3(y)] == KL(pi||ref) exactly
    (enumeration), and a 200k-sample Monte-Carlo mean is within 4 standard errors of it."""
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(6, dtype=torch.float64) * 1.5, -1)
    ref = torch.softmax(torch.randn(6, dtype=torch.float64), -1)
    kl = (pi * (pi.log() - ref.log())).sum()
    k3 = k3_kl(pi.log(), ref.log())
    torch.testing.assert_close((pi * k3).sum(), kl)
    y = torch.multinomial(pi, 200_000, replacement=True)
    est = k3_kl(pi.log()[y], ref.log()[y])
    assert abs(est.mean() - kl) < 4 * est.std() / math.sqrt(len(y))
    assert (k3 >= 0).all()


def test_k3_is_zero_when_policies_agree_and_finite_for_large_ratios():
    lp = torch.tensor([-3.0, -10.0])
    assert torch.equal(k3_kl(lp, lp), torch.zeros(2))
    assert torch.isfinite(k3_kl(torch.tensor([0.0]), torch.tensor([-500.0]))).all()


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.625


def test_golden_reward_by_hand():
    """Chain with 16 states; prompt ends in s, response (a, b): good(+1 each for tokens in {0,1,2,3})
    minus 2 per transition with zero probability (s->a, a->b); special tokens always unsupported."""
    task = SyntheticTask()
    s = 5
    allowed = task.transition[s].nonzero().flatten().tolist()
    a = allowed[0]
    b = task.transition[a].nonzero().flatten().tolist()[0]
    bad = [t for t in range(16) if task.transition[a, t] == 0][0]
    prompt = torch.tensor([[task.bos_id, 1, 2, 3, s]])
    expected_good = float(a in (0, 1, 2, 3)) + float(b in (0, 1, 2, 3))
    assert task.golden_reward(prompt, torch.tensor([[a, b]])).item() == expected_good
    expected_bad = float(a in (0, 1, 2, 3)) + float(bad in (0, 1, 2, 3)) - 2.0
    assert task.golden_reward(prompt, torch.tensor([[a, bad]])).item() == expected_bad
    assert task.golden_reward(prompt, torch.tensor([[a, task.pad_id]])).item() == float(a in (0, 1, 2, 3)) - 2.0


def test_chain_has_the_designed_structure():
    task = SyntheticTask(n_states=16, n_successors=4)
    assert ((task.transition > 0).sum(-1) == 4).all()
    assert (task.transition.diagonal() == 0).all()
    torch.testing.assert_close(task.transition.sum(-1), torch.ones(16))
    seq = task.sample_chain(200, 14, torch.Generator().manual_seed(0))
    assert (task.unsupported_transitions(seq[:, :1], seq[:, 1:]) == 0).all()


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_lm):
    prompts = [[1, 2, 3], [4, 5], [6]]
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = sample_responses(tiny_lm, prompts, max_new_tokens=5, pad_id=0, temperature=0.7, top_p=0.95, seed=3)
    after = torch.rand(1)
    b = sample_responses(tiny_lm, prompts, max_new_tokens=5, pad_id=0, temperature=0.7, top_p=0.95, seed=3)
    assert a == b and all(len(r) == 5 for r in a)
    assert torch.equal(before, after)
