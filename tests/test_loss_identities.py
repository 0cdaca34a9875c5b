"""The IS-DAA paper's identities (Nguyen et al. 2025, arXiv 2506.08681, appendix B), checked by
EXACT enumeration on a small discrete policy.

Set-up. P = 3 prompts, K = 5 responses per prompt. For each prompt p:
    pi_theta(.|p) = softmax(theta[p])     theta: [P, K] float64 logits, requires_grad
    pi_ref(.|p)   = softmax(ref_logits[p]) fixed
    mu(.|p)       = softmax(mu_logits[p])  fixed, a behaviour policy other than pi_ref
A "response" is an index y in 0..K-1, so log pi(y|p) is a sequence log-prob in the library's
sense. Expectations over prompts are uniform means over p; expectations over responses are
exact sums weighted by the probabilities.

Pairs. Two responses a, b are drawn independently from a policy q (q x q, so a == b is possible).
Labelling (explicit and fixed): a fixed golden score s[p, y] (distinct values) decides; the
higher-scored response is chosen: (y_w, y_l) = (a, b) if s[a] >= s[b] else (b, a); for a == b
both are a (rho = 0). The labelling does not depend on theta.

What each test verifies is stated exactly in its docstring, with the constant found.
"""

from __future__ import annotations

import pytest
import torch

from isdpo.losses import LOSSES, PairLogps, build_loss, importance_weights

P, K = 3, 5
BETA = 0.7
DT = torch.float64


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = (1.5 * torch.randn(P, K, generator=g, dtype=DT)).requires_grad_(True)
    ref_logits = torch.randn(P, K, generator=g, dtype=DT)
    mu_logits = torch.randn(P, K, generator=g, dtype=DT)
    score = torch.randn(P, K, generator=g, dtype=DT)
    return theta, ref_logits, mu_logits, score


# all K*K ordered draws (a, b)
A = torch.arange(K).repeat_interleave(K)
B = torch.arange(K).repeat(K)


def _take(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """logp [P, K], idx [P, K*K] -> [P*K*K] (flattened in prompt-major order)."""
    return torch.gather(logp, 1, idx).reshape(-1)


def _pairs(theta, ref_logits, score, labelled=True, mu_logits=None):
    """PairLogps over every prompt and every ordered draw (a, b): [P*K*K] each."""
    logpi = torch.log_softmax(theta, -1)
    logref = torch.log_softmax(ref_logits, -1)
    a, b = A.expand(P, -1), B.expand(P, -1)
    if labelled:
        a_first = torch.gather(score, 1, a) >= torch.gather(score, 1, b)
        w_idx, l_idx = torch.where(a_first, a, b), torch.where(a_first, b, a)
    else:
        w_idx, l_idx = a, b
    lp = PairLogps(
        policy_chosen=_take(logpi, w_idx),
        policy_rejected=_take(logpi, l_idx),
        ref_chosen=_take(logref, w_idx),
        ref_rejected=_take(logref, l_idx),
    )
    if mu_logits is not None:
        logmu = torch.log_softmax(mu_logits, -1)
        lp.behavior_chosen = _take(logmu, w_idx)
        lp.behavior_rejected = _take(logmu, l_idx)
    return lp


def _draw_prob(logits) -> torch.Tensor:
    """q(a) q(b) for every ordered draw: [P, K*K]."""
    q = torch.softmax(logits, -1)
    return q[:, A] * q[:, B]


def _expect(prob: torch.Tensor, per_pair: torch.Tensor) -> torch.Tensor:
    """E_x E_{(a,b)~q x q}[per_pair]: exact sum over draws, uniform mean over prompts."""
    return (prob * per_pair.reshape(P, K * K)).sum(1).mean()


def _kl(theta, ref_logits) -> torch.Tensor:
    """E_x KL(pi_theta || pi_ref), exact."""
    logpi, logref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    return (logpi.exp() * (logpi - logref)).sum(1).mean()


def _grad(scalar, theta) -> torch.Tensor:
    (g,) = torch.autograd.grad(scalar, theta)
    return g


def _rho(lp: PairLogps) -> torch.Tensor:
    return (lp.policy_chosen - lp.ref_chosen) - (lp.policy_rejected - lp.ref_rejected)


# ------------------------------------------------------------------------------------------
# (1) Unbiasedness: IS-DPO on pi_ref pairs is online DPO (paper's Thm. 1, B.1)
# ------------------------------------------------------------------------------------------


def test_is_dpo_is_unbiased_for_online_dpo():
    """Verified exactly (no clip, pairs labelled as in the module docstring):

        E_x E_{(a,b) ~ pi_ref x pi_ref}[ w * f_DPO(beta rho(y_w, y_l)) ]
            == E_x E_{(a,b) ~ pi_theta x pi_theta}[ f_DPO(beta rho(y_w, y_l)) ]

    with w = pi_theta(a)pi_theta(b) / (pi_ref(a)pi_ref(b)), the library's pair weight (the
    product is symmetric, so labelling does not change w). The left side uses the library's
    IS-DPO (DAALoss, log_clip=None) per-pair losses; the right side LOSSES["dpo"] unweighted.

    Also verified: the same holds with a behaviour policy mu != pi_ref (pairs ~ mu x mu,
    PairLogps.behavior_* set), and with the paper's clip the estimate is strictly lower
    (w_clip <= w and f > 0): the clip is a bias.
    """
    theta, ref_logits, mu_logits, score = _setup()
    lp = _pairs(theta, ref_logits, score)
    is_dpo = build_loss("dpo", BETA, importance_sampling={"enabled": True, "log_clip": None})
    f = LOSSES["dpo"](lp, BETA)[0]
    online = _expect(_draw_prob(theta), f)
    offline_is = _expect(_draw_prob(ref_logits), is_dpo(lp).losses)
    torch.testing.assert_close(offline_is, online, rtol=1e-12, atol=1e-12)
    # without the weight the offline objective is a different number
    offline = _expect(_draw_prob(ref_logits), f)
    assert abs(offline - online) > 0.05

    lp_mu = _pairs(theta, ref_logits, score, mu_logits=mu_logits)
    offline_mu = _expect(_draw_prob(mu_logits), is_dpo(lp_mu).losses)
    torch.testing.assert_close(offline_mu, online, rtol=1e-12, atol=1e-12)

    clipped = build_loss("dpo", BETA, importance_sampling={"enabled": True, "log_clip": 0.5})(lp)
    assert (clipped.weights < is_dpo(lp).weights).any()
    assert _expect(_draw_prob(ref_logits), clipped.losses) < online - 1e-3


def test_is_dpo_gradient_is_online_dpo_gradient_with_samples_held_fixed():
    """What the unbiasedness means for the gradient (verified exactly):

        grad E_ref[stopgrad(w) f]  ==  E_x sum_{a,b} stopgrad(pi_theta(a)pi_theta(b)) grad f
                                   ==  E_{pi_theta x pi_theta}[grad f]

    i.e. the gradient of online DPO as it is run (samples are data, no gradient through the
    sampling). It is NOT grad E_{pi_theta x pi_theta}[f], which also has the score-function
    term E[f * grad log pi_theta(a)pi_theta(b)]; the test asserts that gap is non-zero.
    Thm. 1's "unbiased" is about the loss value; that is the precise gradient statement.
    """
    theta, ref_logits, _, score = _setup(1)
    lp = _pairs(theta, ref_logits, score)
    is_dpo = build_loss("dpo", BETA, importance_sampling={"enabled": True, "log_clip": None})
    g_is = _grad(_expect(_draw_prob(ref_logits), is_dpo(lp).losses), theta)

    lp = _pairs(theta, ref_logits, score)
    f = LOSSES["dpo"](lp, BETA)[0]
    g_fixed = _grad(_expect(_draw_prob(theta).detach(), f), theta)
    torch.testing.assert_close(g_is, g_fixed, rtol=1e-10, atol=1e-12)

    lp = _pairs(theta, ref_logits, score)
    g_full = _grad(_expect(_draw_prob(theta), LOSSES["dpo"](lp, BETA)[0]), theta)
    assert (g_full - g_fixed).norm() > 0.05 * g_full.norm()


# ------------------------------------------------------------------------------------------
# (2) The IS-weighted squared log-ratio has the KL gradient (paper's B.1, second part)
# ------------------------------------------------------------------------------------------


def test_single_response_weighted_square_has_the_kl_gradient():
    """Single-response form, verified exactly:

        grad_theta 1/2 E_x E_{y~pi_ref}[ stopgrad(w(y)) (log pi_theta(y)/pi_ref(y))^2 ]
            == grad_theta E_x KL(pi_theta || pi_ref),      w(y) = pi_theta(y)/pi_ref(y)

    Derivation: the gradient is E_ref[w r grad r] = sum_y pi_theta(y) r(y) grad log pi_theta(y),
    and grad KL = sum_y pi_theta (r + 1) grad log pi_theta = the same, since
    sum_y pi_theta grad log pi_theta = grad sum_y pi_theta = 0. (w is computed directly here:
    the library's weights are pair weights.)
    """
    theta, ref_logits, _, _ = _setup(2)
    logpi, logref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    r = logpi - logref
    w = r.detach().exp()
    reg = 0.5 * (torch.softmax(ref_logits, -1) * w * r**2).sum(1).mean()
    torch.testing.assert_close(_grad(reg, theta), _grad(_kl(theta, ref_logits), theta), rtol=1e-10, atol=1e-12)


def test_pair_weighted_square_has_twice_the_kl_gradient():
    """Pair form with independent pairs, verified exactly, with the constant 2:

        grad 1/2 E_x E_{(a,b)~pi_ref x pi_ref}[ stopgrad(w) rho^2 ] == 2 grad E_x KL(pi_theta||pi_ref)

    w = the library's pair weight (importance_weights, log_clip=None), rho from the labelled
    pairs (rho^2 is symmetric, so labelling is irrelevant). Derivation, with r = log pi/pi_ref
    and g = grad log pi_theta: the gradient is E_{pi_theta x pi_theta}[(r_a - r_b)(g_a - g_b)]
    = E[r_a g_a] + E[r_b g_b] - E[r_a] E[g_b] - E[r_b] E[g_a]. Independence splits the cross
    terms and E_{pi_theta}[g] = 0 kills them, leaving 2 E_{pi_theta}[r g] = 2 grad KL.
    The paper's appendix B.1 ends with "= grad KL": it merges the two equal terms E[r_a g_a]
    and E[r_b g_b] into one, dropping this factor 2 (harmless: it rescales beta).
    """
    theta, ref_logits, _, score = _setup(3)
    lp = _pairs(theta, ref_logits, score)
    w, _ = importance_weights(lp, log_clip=None)
    reg = 0.5 * _expect(_draw_prob(ref_logits), w * _rho(lp) ** 2)
    torch.testing.assert_close(_grad(reg, theta), 2 * _grad(_kl(theta, ref_logits), theta), rtol=1e-10, atol=1e-12)


def test_is_ipo_over_both_orders_has_twice_the_kl_gradient():
    """The same statement through the library's IS-IPO, verified exactly: over all ordered draws
    (chosen = a, rejected = b, both orders present, no preference labels),

        grad 1/2 E_x E_{pi_ref x pi_ref}[ stopgrad(w) (rho - 1/(2 beta))^2 ] == 2 grad KL

    because (rho - c)^2 = rho^2 - 2c rho + c^2 and the linear term's gradient
    -c E_{pi_theta x pi_theta}[g_a - g_b] is 0 for a symmetric pair distribution. (With
    labelled pairs that term is the preference signal and does not vanish.)
    """
    theta, ref_logits, _, score = _setup(4)
    lp = _pairs(theta, ref_logits, score, labelled=False)
    is_ipo = build_loss("ipo", BETA, importance_sampling={"enabled": True, "log_clip": None})
    reg = 0.5 * _expect(_draw_prob(ref_logits), is_ipo(lp).losses)
    torch.testing.assert_close(_grad(reg, theta), 2 * _grad(_kl(theta, ref_logits), theta), rtol=1e-10, atol=1e-12)


def test_distinct_pairs_change_the_constant():
    """If pairs with a == b are dropped (as data sets drop chosen == rejected), pairs come from
    pi_ref x pi_ref conditioned on a != b, i.e. probability pi_ref(a)pi_ref(b)/Z_x with
    Z_x = 1 - sum_y pi_ref(y|x)^2, while the weight stays the unnormalised product ratio.
    The a == b terms were zero (rho = 0), so the sum is unchanged and only 1/Z_x appears.
    Verified exactly:

        grad 1/2 E_x E_{a != b}[ stopgrad(w) rho^2 ] == E_x (2 / Z_x) grad KL_x(pi_theta||pi_ref)

    a per-prompt rescaling (here Z_x ~ 0.72-0.73, so ~2.75 grad KL), not 2 grad KL; asserted
    different. The same 1/Z_x factor breaks the value identity (1) for such data.
    """
    theta, ref_logits, _, score = _setup(5)
    lp = _pairs(theta, ref_logits, score)
    w, _ = importance_weights(lp, log_clip=None)
    distinct = (A != B).to(DT)
    ref = torch.softmax(ref_logits, -1)
    Z = 1 - (ref**2).sum(1)
    reg = 0.5 * _expect(_draw_prob(ref_logits) * distinct / Z[:, None], w * _rho(lp) ** 2)
    logpi, logref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    kl_x = (logpi.exp() * (logpi - logref)).sum(1)
    g = _grad(reg, theta)
    torch.testing.assert_close(g, _grad((2 * kl_x / Z).mean(), theta), rtol=1e-10, atol=1e-12)
    g_kl2 = 2 * _grad(_kl(theta, ref_logits), theta)
    assert (g - g_kl2).norm() > 0.05 * g_kl2.norm()


# ------------------------------------------------------------------------------------------
# (3) Without the weight the regulariser is not the KL gradient (paper's B.2)
# ------------------------------------------------------------------------------------------


def test_unweighted_square_is_not_the_kl_gradient():
    """Unweighted pair form, verified exactly (the paper's B.2):

        grad 1/2 E_x E_{pi_ref x pi_ref}[rho^2]
            == 2 E_x E_{y~pi_ref}[r grad log pi_theta] + 2 E_x KL(pi_ref||pi_theta) E_{y~pi_ref}[grad log pi_theta]

    (same expansion as above, but now under pi_ref: E_ref[g] != 0 and E_ref[r] = -KL(ref||theta)).
    It differs clearly from the KL gradient 2 grad KL(pi_theta||pi_ref): asserted relative gap
    > 25% here.
    """
    theta, ref_logits, _, score = _setup(6)
    lp = _pairs(theta, ref_logits, score)
    g_unw = _grad(0.5 * _expect(_draw_prob(ref_logits), _rho(lp) ** 2), theta)

    logpi, logref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    ref = logref.exp()
    r = (logpi - logref).detach()
    kl_ref_theta = (ref * (logref - logpi)).sum(1).detach()
    b2 = 2 * (ref * r * logpi).sum(1).mean() + 2 * (kl_ref_theta * (ref * logpi).sum(1)).mean()
    torch.testing.assert_close(g_unw, _grad(b2, theta), rtol=1e-10, atol=1e-12)

    g_kl2 = 2 * _grad(_kl(theta, ref_logits), theta)
    assert (g_unw - g_kl2).norm() > 0.25 * g_kl2.norm()


def test_unweighted_regulariser_is_blind_where_the_data_are_absent():
    """Response 4 is (nearly) absent from the data: pi_ref(4) ~ 3e-5, yet pi_theta(4) ~ 0.54.
    The KL gradient (= the IS-weighted regulariser's) pushes the logit of 4 down hard; the
    unweighted one barely notices. Exactly: its gradient on logit y is
    2 pi_ref(y) E_{b~pi_ref}[r_y - r_b] (the pi_theta(y) parts of g_a - g_b cancel), so it is
    proportional to pi_ref(y). Asserted: |unweighted| < 1% of |IS-weighted| on that logit
    (about 2e-4 against 1.76 here).
    """
    ref_logits = torch.tensor([[0.0, 0.3, -0.2, 0.1, -9.0]], dtype=DT).expand(P, K).contiguous()
    theta = torch.tensor([[0.0, 0.3, -0.2, 0.1, 1.6]], dtype=DT).expand(P, K).contiguous().requires_grad_(True)
    score = torch.arange(K, dtype=DT).expand(P, K)
    lp = _pairs(theta, ref_logits, score)
    w, _ = importance_weights(lp, log_clip=None)
    g_is = _grad(0.5 * _expect(_draw_prob(ref_logits), w * _rho(lp) ** 2), theta)
    lp = _pairs(theta, ref_logits, score)
    g_unw = _grad(0.5 * _expect(_draw_prob(ref_logits), _rho(lp) ** 2), theta)
    assert torch.softmax(theta, -1)[0, 4] > 0.4 and torch.softmax(ref_logits, -1)[0, 4] < 2e-4
    assert g_is[0, 4] > 1.0  # gradient descent lowers the logit of the unsupported response
    assert g_unw[0, 4].abs() < 0.01 * g_is[0, 4].abs()
