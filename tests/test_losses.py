"""Unit tests of isdpo.losses: hand-derived values, IS composition, gradients, numerics, validation
and the conf/loss configs.

Expected numbers are derived in the docstrings and asserted with math.log / math.exp, never with
the function under test. softplus(z) = log(1 + e^z), so -log sigmoid(u) = softplus(-u).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from isdpo import losses as losses_module
from isdpo.losses import (
    LOSSES,
    DAALoss,
    ISConfig,
    LossOutput,
    PairLogps,
    build_loss,
    importance_weights,
)
from isdpo.schema import ImportanceSampling
from tests.hydra_utils import compose_cfg

CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"


def sp(z: float) -> float:
    """softplus(z) = log(1 + e^z) = -log sigmoid(-z)."""
    return math.log1p(math.exp(z))


def t(*xs, dtype=torch.float32, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def hand_batch(grad: bool = False, dtype=torch.float32) -> PairLogps:
    """The two-pair batch used by the hand-derived tests.

    pair 0: log pi(y_w) = -1, log pi(y_l) = -2, log ref(y_w) = -1.5, log ref(y_l) = -1.5,
            |y_w| = 3, |y_l| = 5  ->  r_w = 0.5,  r_l = -0.5, rho = 1.0
    pair 1: log pi(y_w) = -3, log pi(y_l) = -1, log ref(y_w) = -2,   log ref(y_l) = -2.5,
            |y_w| = 5, |y_l| = 2  ->  r_w = -1.0, r_l = 1.5,  rho = -2.5
    """
    return PairLogps(
        policy_chosen=t(-1.0, -3.0, dtype=dtype, grad=grad),
        policy_rejected=t(-2.0, -1.0, dtype=dtype, grad=grad),
        ref_chosen=t(-1.5, -2.0, dtype=dtype),
        ref_rejected=t(-1.5, -2.5, dtype=dtype),
        chosen_lengths=torch.tensor([3, 5]),
        rejected_lengths=torch.tensor([5, 2]),
    )


def grad_of(x: torch.Tensor) -> torch.Tensor:
    """x.grad, or zeros where the loss does not use x (sft ignores the rejected response)."""
    return torch.zeros_like(x) if x.grad is None else x.grad


def assert_values(out: LossOutput, expected: list[float], tol: float = 1e-5):
    assert out.losses.shape == (len(expected),)
    for got, want in zip(out.losses.tolist(), expected):
        assert got == pytest.approx(want, abs=tol, rel=tol)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), abs=tol, rel=tol)


# ------------------------------------------------------------------------------------------
# Hand-derived values, one test per base loss (beta = 0.5 unless stated: beta*rho = [0.5, -1.25])
# ------------------------------------------------------------------------------------------


def test_dpo_values_and_trl_metrics():
    """DPO, beta = 0.5: u = beta*rho = [0.5, -1.25]; f = -log sigmoid(u) = softplus(-u)
        f0 = log(1 + e^-0.5)  ~ 0.474077
        f1 = log(1 + e^1.25)  ~ 1.501929           loss = (f0 + f1)/2 ~ 0.988003
    rewards: chosen = beta*r_w = [0.25, -0.5], rejected = beta*r_l = [-0.25, 0.75]
        rewards/chosen = -0.125, rewards/rejected = 0.25, rewards/margins = (0.5 - 1.25)/2 = -0.375
        rewards/accuracies = 1/2 (pair 0 right, pair 1 wrong)
        logps/chosen = (-1 - 3)/2 = -2, logps/rejected = (-2 - 1)/2 = -1.5
    """
    out = build_loss("dpo", 0.5)(hand_batch())
    assert_values(out, [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.25))])
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.75])
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m == pytest.approx(
        {
            "rewards/chosen": -0.125,
            "rewards/rejected": 0.25,
            "rewards/margins": -0.375,
            "rewards/accuracies": 0.5,
            "logps/chosen": -2.0,
            "logps/rejected": -1.5,
        }
    )
    assert out.weights is None
    assert not any(k.startswith("is/") for k in out.metrics)
    assert not out.chosen_rewards.requires_grad


def test_cdpo_label_smoothing_values():
    """Conservative DPO, eps = 0.25, beta = 0.5:
        f = (1 - eps) softplus(-u) + eps softplus(u), and softplus(u) = u + softplus(-u), so
        f = softplus(-u) + eps*u
        f0 = log(1 + e^-0.5) + 0.25*0.5    ~ 0.474077 + 0.125  = 0.599077
        f1 = log(1 + e^1.25) - 0.25*1.25   ~ 1.501929 - 0.3125 = 1.189429
    """
    out = build_loss("dpo", 0.5, {"label_smoothing": 0.25})(hand_batch())
    assert_values(
        out,
        [0.75 * sp(-0.5) + 0.25 * sp(0.5), 0.75 * sp(1.25) + 0.25 * sp(-1.25)],
    )
    assert out.losses.tolist() == pytest.approx([sp(-0.5) + 0.125, sp(1.25) - 0.3125], abs=1e-5)


def test_ipo_values():
    """IPO, beta = 0.5: 1/(2 beta) = 1; f = (rho - 1)^2
        f0 = (1 - 1)^2 = 0,  f1 = (-2.5 - 1)^2 = 12.25,  loss = 6.125
    """
    assert_values(build_loss("ipo", 0.5)(hand_batch()), [0.0, 12.25])


def test_slic_values():
    """SLiC/hinge, beta = 0.5: f = max(0, 1 - beta*rho)
        f0 = max(0, 1 - 0.5) = 0.5,  f1 = max(0, 1 + 1.25) = 2.25,  loss = 1.375
    and with beta = 2: f0 = max(0, 1 - 2) = 0 (beyond the margin), f1 = 1 + 5 = 6.
    """
    assert_values(build_loss("slic", 0.5)(hand_batch()), [0.5, 2.25])
    assert_values(build_loss("slic", 2.0)(hand_batch()), [0.0, 6.0])


def test_rpo_values():
    """RPO, beta = 0.5, eta = 0.1: f = softplus(-u) - beta*eta*log pi(y_w)
        f0 = log(1 + e^-0.5) - 0.05*(-1) ~ 0.474077 + 0.05 = 0.524077
        f1 = log(1 + e^1.25) - 0.05*(-3) ~ 1.501929 + 0.15 = 1.651929
    default eta = 0.005: f0 = log(1 + e^-0.5) + 0.0025
    """
    assert_values(build_loss("rpo", 0.5, {"eta": 0.1})(hand_batch()), [sp(-0.5) + 0.05, sp(1.25) + 0.15])
    out = build_loss("rpo", 0.5)(hand_batch())
    assert out.losses[0].item() == pytest.approx(sp(-0.5) + 0.0025, abs=1e-6)


def test_chipo_values_and_clip():
    """chi-PO, beta = 0.5: f = softplus(-beta*[(r_w - r_l) + e^r_w - e^r_l])
        pair 0: r = (0.5, -0.5): 1 + e^0.5 - e^-0.5 ~ 1 + 1.648721 - 0.606531 = 2.042191
                f0 = log(1 + e^(-0.5*2.042191)) = log(1 + e^-1.021095) ~ 0.307641
        pair 1: r = (-1, 1.5):  -2.5 + e^-1 - e^1.5 ~ -2.5 + 0.367879 - 4.481689 = -6.613810
                f1 = log(1 + e^3.306905) ~ 3.342985
    log_ratio_clip = 1: r_l = 1.5 enters the exp as min(1.5, 1) = 1; pair 0 unchanged:
                f1 = log(1 + e^(-0.5*(-2.5 + e^-1 - e^1))) = log(1 + e^2.425201)
    """
    e = math.exp
    f0 = sp(-0.5 * (1 + e(0.5) - e(-0.5)))
    assert_values(build_loss("chipo", 0.5)(hand_batch()), [f0, sp(-0.5 * (-2.5 + e(-1) - e(1.5)))])
    assert_values(
        build_loss("chipo", 0.5, {"log_ratio_clip": 1.0})(hand_batch()),
        [f0, sp(-0.5 * (-2.5 + e(-1) - e(1.0)))],
    )
    # null = no cap: same as the default here (no |r| reaches 10)
    assert_values(build_loss("chipo", 0.5, {"log_ratio_clip": None})(hand_batch()), [f0, sp(-0.5 * (-2.5 + e(-1) - e(1.5)))])


def test_rdpo_values_and_sign():
    """R-DPO, beta = 0.5, alpha = 0.1: f = softplus(-(beta*rho + alpha*(|y_w| - |y_l|)))
        pair 0: |y_w| - |y_l| = 3 - 5 = -2: argument 0.5 - 0.2 = 0.3,   f0 = log(1 + e^-0.3)
        pair 1: |y_w| - |y_l| = 5 - 2 = 3:  argument -1.25 + 0.3 = -0.95, f1 = log(1 + e^0.95)
    The pair whose chosen response is longer (pair 1) gets the lower loss than under DPO
    (log(1 + e^1.25)): length explains part of the preference (Park et al.'s sign, see
    rdpo_loss). alpha = -0.1 gives the other sign: arguments 0.7 and -1.55.
    """
    assert_values(build_loss("rdpo", 0.5, {"alpha": 0.1})(hand_batch()), [sp(-0.3), sp(0.95)])
    assert_values(build_loss("rdpo", 0.5, {"alpha": -0.1})(hand_batch()), [sp(-0.7), sp(1.55)])
    dpo = build_loss("dpo", 0.5)(hand_batch())
    rdpo = build_loss("rdpo", 0.5, {"alpha": 0.1})(hand_batch())
    assert rdpo.losses[1] < dpo.losses[1]


def test_sft_values():
    """SFT: f = -log pi(y_w)/|y_w|: f0 = 1/3, f1 = 3/5, loss = (1/3 + 3/5)/2 = 7/15.
    Works without reference log-probs; rewards then are beta*log pi/|y|:
        beta = 0.5: chosen = [-1/6, -3/10], rejected = [-1/5, -1/4]
    """
    assert_values(build_loss("sft", 0.5)(hand_batch()), [1 / 3, 3 / 5])
    lp = hand_batch()
    lp.ref_chosen = lp.ref_rejected = None
    out = build_loss("sft", 0.5)(lp)
    assert_values(out, [1 / 3, 3 / 5])
    assert out.chosen_rewards.tolist() == pytest.approx([-1 / 6, -3 / 10])
    assert out.rejected_rewards.tolist() == pytest.approx([-1 / 5, -1 / 4])


def test_simpo_values_reference_free():
    """SimPO, beta = 2, gamma_beta_ratio = 0.5 -> gamma = 1:
        pair 0: log pi/|y|: chosen -1/3, rejected -2/5; 2*(-1/3 + 2/5) - 1 = 2/15 - 1 = -13/15
                f0 = log(1 + e^(13/15))
        pair 1: chosen -3/5, rejected -1/2; 2*(-3/5 + 1/2) - 1 = -0.2 - 1 = -1.2
                f1 = log(1 + e^1.2)
        rewards = beta*log pi/|y|: chosen [-2/3, -6/5], rejected [-4/5, -1]
    gamma_beta_ratio = 0 (no margin): f0 = log(1 + e^(-2/15)), f1 = log(1 + e^0.2).
    The reference log-probs are not needed (and not used).
    """
    lp = hand_batch()
    lp.ref_chosen = lp.ref_rejected = None
    out = build_loss("simpo", 2.0)(lp)
    assert_values(out, [sp(13 / 15), sp(1.2)])
    assert out.chosen_rewards.tolist() == pytest.approx([-2 / 3, -6 / 5])
    assert out.rejected_rewards.tolist() == pytest.approx([-4 / 5, -1.0])
    assert_values(build_loss("simpo", 2.0, {"gamma_beta_ratio": 0.0})(lp), [sp(-2 / 15), sp(0.2)])
    assert_values(build_loss("simpo", 2.0)(hand_batch()), [sp(13 / 15), sp(1.2)])


def base_loss_functions() -> dict[str, object]:
    """The functions of isdpo.losses with a base loss's signature ``fn(logps, beta, ...)``."""
    return {name: fn for name, fn in vars(losses_module).items()
            if inspect.isfunction(fn) and fn.__module__ == losses_module.__name__
            and list(inspect.signature(fn).parameters)[:2] == ["logps", "beta"]}


def test_registry_is_complete():
    """A new loss is its function (registered in LOSSES), its conf/loss file and its tests; nothing else lists
    the losses, so the registry is checked against those."""
    assert sorted(fn.__name__ for fn in LOSSES.values()) == sorted(base_loss_functions())  # every one registered
    tests = [name for name in globals() if name.startswith("test_")]
    for name, fn in LOSSES.items():
        assert fn.__name__ == f"{name}_loss"
        assert fn.__doc__, name
        assert "arXiv" in fn.__doc__ or name == "sft", name  # SFT is the one loss without a paper
        assert isinstance(fn.needs_reference, bool) and isinstance(fn.needs_lengths, bool)
        assert yaml_base(CONF_LOSS / f"{name}.yaml") == name, f"conf/loss/{name}.yaml: the loss's own config"
        assert any(t.startswith(f"test_{name}_") for t in tests), f"test_{name}_...: its hand-derived values"


def yaml_base(path: Path) -> str | None:
    return OmegaConf.load(path).get("base") if path.exists() else None


def test_importance_sampling_defaults_have_one_home():
    """The config's IS block (isdpo.schema.ImportanceSampling) gives ISConfig and importance_weights their
    defaults: a direct call, a built loss and a config that leaves the block alone weight the same way."""
    home = {k: v for k, v in vars(ImportanceSampling()).items() if k != "enabled"}
    assert vars(ISConfig()) == home
    signature = inspect.signature(importance_weights).parameters
    assert {k: signature[k].default for k in home} == home
    assert build_loss("dpo", 0.1, importance_sampling={"enabled": True}).importance_sampling == ISConfig()


# ------------------------------------------------------------------------------------------
# Importance sampling: hand case, options, composition
# ------------------------------------------------------------------------------------------


def is_batch(dtype=torch.float32, grad=False) -> PairLogps:
    """Four pairs, reference log-probs all 0 (so mu = pi_ref = 0 in log space):
        log pi(y_w) = [0, 0.5, 1, -1], log pi(y_l) = [0, 0, 2, 0]
        log w = sum of both = [0, 0.5, 3, -1]; rho = difference = [0, 0.5, -1, -1]
        lengths |y_w| = [1, 1, 2, 3], |y_l| = [1, 4, 1, 1] (sums 2, 5, 3, 4)
    """
    z = torch.zeros(4, dtype=dtype)
    return PairLogps(
        policy_chosen=t(0.0, 0.5, 1.0, -1.0, dtype=dtype, grad=grad),
        policy_rejected=t(0.0, 0.0, 2.0, 0.0, dtype=dtype, grad=grad),
        ref_chosen=z,
        ref_rejected=z.clone(),
        chosen_lengths=torch.tensor([1, 1, 2, 3]),
        rejected_lengths=torch.tensor([1, 4, 1, 1]),
    )


def test_importance_weights_hand_case_and_diagnostics():
    """log w = [0, 0.5, 3, -1], log_clip = 2 -> clipped log w = [0, 0.5, 2, -1]
        w = [1, e^0.5, e^2, e^-1]
        raw:     mean = (1 + e^0.5 + e^3 + e^-1)/4, max = e^3, mean log w = 2.5/4 = 0.625
        clipped: S = 1 + e^0.5 + e^2 + e^-1 ~ 10.405656, mean = S/4, max = e^2
                 frac_clipped = 1/4 (only the pair with log w = 3)
                 Q = sum w^2 = 1 + e + e^4 + e^-2 ~ 58.451767
                 ess = S^2/Q ~ 108.277686/58.451767 ~ 1.852428, ess_frac ~ 0.463107
    """
    e = math.exp
    w, m = importance_weights(is_batch(), log_clip=2.0)
    assert w.tolist() == pytest.approx([1.0, e(0.5), e(2.0), e(-1.0)])
    assert not w.requires_grad
    S = 1 + e(0.5) + e(2) + e(-1)
    Q = 1 + e(1) + e(4) + e(-2)
    want = {
        "is/weight_raw_mean": (1 + e(0.5) + e(3) + e(-1)) / 4,
        "is/weight_raw_max": e(3),
        "is/log_weight_raw_mean": 0.625,
        "is/log_weight_raw_max": 3.0,
        "is/weight_mean": S / 4,
        "is/weight_max": e(2),
        "is/frac_clipped": 0.25,
        "is/ess": S * S / Q,
        "is/ess_frac": S * S / Q / 4,
    }
    assert {k: v.item() for k, v in m.items()} == pytest.approx(want, rel=1e-5)
    assert S * S / Q == pytest.approx(1.852428, abs=1e-6)


def test_is_dpo_hand_case():
    """IS-DPO, beta = 1, log_clip = 2: f = softplus(-rho) with rho = [0, 0.5, -1, -1]:
        f = [log 2, log(1 + e^-0.5), log(1 + e), log(1 + e)]
        losses = w*f = [log 2, e^0.5 log(1 + e^-0.5), e^2 log(1 + e), e^-1 log(1 + e)]
        loss = sum(losses)/4
    self_normalize: loss = sum(w f)/sum(w) = sum(losses)/S (losses carry 4w/S)
    """
    e = math.exp
    w = [1.0, e(0.5), e(2.0), e(-1.0)]
    f = [math.log(2), sp(-0.5), sp(1.0), sp(1.0)]
    out = build_loss("dpo", 1.0, importance_sampling={"enabled": True, "log_clip": 2.0})(is_batch())
    assert_values(out, [wi * fi for wi, fi in zip(w, f)])
    assert out.weights.tolist() == pytest.approx(w)
    out = build_loss("dpo", 1.0, importance_sampling={"self_normalize": True})(is_batch())
    S = sum(w)
    assert out.loss.item() == pytest.approx(sum(wi * fi for wi, fi in zip(w, f)) / S, rel=1e-6)
    assert out.weights.tolist() == pytest.approx([4 * wi / S for wi in w], rel=1e-6)
    # the diagnostics describe the weights before normalisation
    assert out.metrics["is/weight_mean"].item() == pytest.approx(S / 4, rel=1e-6)


def test_is_options_lower_clip_token_mean_no_clip():
    """lower_log_clip = -0.5: log w = [0, 0.5, 2, -0.5] (two pairs clipped: frac 1/2).
    token_mean: log w / (|y_w| + |y_l|) = [0/2, 0.5/5, 3/3, -1/4] = [0, 0.1, 1, -0.25]; no
    pair reaches the cap 2. log_clip = None: w = [1, e^0.5, e^3, e^-1] (frac_clipped 0).
    log_clip = 0: log w -> [0, 0, 0, -1], w = [1, 1, 1, e^-1]; the pairs with log w = 0.5 and 3
    are changed (log w = 0 sits on the cap and is not): frac_clipped = 2/4.
    """
    e = math.exp
    w, m = importance_weights(is_batch(), log_clip=2.0, lower_log_clip=-0.5)
    assert w.tolist() == pytest.approx([1, e(0.5), e(2), e(-0.5)])
    assert m["is/frac_clipped"].item() == 0.5
    w, m = importance_weights(is_batch(), weight="token_mean")
    assert w.tolist() == pytest.approx([1, e(0.1), e(1), e(-0.25)])
    assert m["is/log_weight_raw_mean"].item() == pytest.approx((0 + 0.1 + 1 - 0.25) / 4)
    assert m["is/frac_clipped"].item() == 0.0
    w, m = importance_weights(is_batch(), log_clip=None)
    assert w.tolist() == pytest.approx([1, e(0.5), e(3), e(-1)])
    assert m["is/frac_clipped"].item() == 0.0
    w, m = importance_weights(is_batch(), log_clip=0.0)
    assert w.tolist() == pytest.approx([1, 1, 1, e(-1)])
    assert m["is/frac_clipped"].item() == 0.5


def test_behaviour_logps_replace_reference_as_mu():
    """With behaviour log-probs mu: log w = (log pi - log mu)(y_w) + (log pi - log mu)(y_l).
    mu = pi gives w = 1 even though pi != pi_ref; mu = pi - 0.25 on both gives log w = 0.5.
    rho (and so f) still uses pi_ref.
    """
    lp = is_batch()
    lp.behavior_chosen = lp.policy_chosen.detach().clone()
    lp.behavior_rejected = lp.policy_rejected.detach().clone()
    w, _ = importance_weights(lp)
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0]
    lp.behavior_chosen = lp.behavior_chosen - 0.25
    lp.behavior_rejected = lp.behavior_rejected - 0.25
    w, _ = importance_weights(lp)
    assert w.tolist() == pytest.approx([math.exp(0.5)] * 4)
    out = build_loss("dpo", 1.0, importance_sampling={"enabled": True})(lp)
    base = build_loss("dpo", 1.0)(lp)
    assert torch.allclose(out.losses, math.exp(0.5) * base.losses)


def random_batch(B=5, seed=0, dtype=torch.float64, same_policy_and_ref=False, grad=True):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(B, generator=g, dtype=dtype) * 20 - 1
    pr = -torch.rand(B, generator=g, dtype=dtype) * 20 - 1
    if same_policy_and_ref:
        rc, rr = pc.clone(), pr.clone()
    else:
        rc = pc + torch.randn(B, generator=g, dtype=dtype)
        rr = pr + torch.randn(B, generator=g, dtype=dtype)
    return PairLogps(
        policy_chosen=pc.requires_grad_(grad),
        policy_rejected=pr.requires_grad_(grad),
        ref_chosen=rc,
        ref_rejected=rr,
        chosen_lengths=torch.randint(1, 30, (B,), generator=g),
        rejected_lengths=torch.randint(1, 30, (B,), generator=g),
    )


@pytest.mark.parametrize("base", sorted(LOSSES))
def test_is_equals_base_when_policy_is_reference(base):
    """pi_theta = pi_ref -> log w = 0 exactly -> w = exp(0) = 1 -> IS-X == X bit for bit
    (values, per-pair losses, rewards, base metrics and gradients)."""
    beta = 2.0 if base == "simpo" else 0.1
    lp_a = random_batch(same_policy_and_ref=True, dtype=torch.float32)
    lp_b = random_batch(same_policy_and_ref=True, dtype=torch.float32)
    x = build_loss(base, beta)(lp_a)
    isx = build_loss(base, beta, importance_sampling={"enabled": True, "log_clip": 2.0})(lp_b)
    assert torch.equal(isx.weights, torch.ones(5))
    assert torch.equal(isx.losses, x.losses) and torch.equal(isx.loss, x.loss)
    assert torch.equal(isx.chosen_rewards, x.chosen_rewards)
    for k, v in x.metrics.items():
        assert torch.equal(isx.metrics[k], v), k
    x.loss.backward()
    isx.loss.backward()
    assert torch.equal(grad_of(lp_a.policy_chosen), grad_of(lp_b.policy_chosen))
    assert torch.equal(grad_of(lp_a.policy_rejected), grad_of(lp_b.policy_rejected))
    assert isx.metrics["is/ess_frac"].item() == pytest.approx(1.0)
    # self-normalised: B * softmax(0) = 1 up to rounding
    sn = build_loss(base, beta, importance_sampling={"self_normalize": True})(lp_b)
    assert torch.allclose(sn.losses, x.losses, rtol=1e-6)


@pytest.mark.parametrize("base", sorted(LOSSES))
def test_no_gradient_through_the_weight(base):
    """d(IS loss)/d(log pi) = w * d(base loss)/d(log pi), pair by pair: the weight is a constant
    (if it were not, the gradient would get the extra term f * dw/dlog pi = f * w)."""
    beta = 2.0 if base == "simpo" else 0.1
    lp_is, lp_base = random_batch(seed=1), random_batch(seed=1)
    out = build_loss(base, beta, importance_sampling={"enabled": True, "log_clip": 1.0})(lp_is)
    out.loss.backward()
    build_loss(base, beta)(lp_base).loss.backward()
    w = out.weights
    clipped = torch.isclose(w, torch.tensor(math.exp(1.0), dtype=w.dtype))
    assert clipped.any() and not clipped.all()  # some pairs clipped, some weighted below the cap
    for name in ("policy_chosen", "policy_rejected"):
        got = grad_of(getattr(lp_is, name))
        want = w * grad_of(getattr(lp_base, name))
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), name


# ------------------------------------------------------------------------------------------
# Numerics: log-ratios of +-1e4 in fp32 and bf16
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", sorted(LOSSES))
def test_extreme_log_ratios_are_finite(base, dtype):
    """Sequence log-ratios of +-1e4 (policy 1e4 nats above/below the reference): losses,
    gradients, weights and every metric are finite. log w = +2e4 clips to exactly e^2 (the clip
    is taken in log space; exp first would give inf), log w = -2e4 gives w = 0."""
    big = 1e4
    ref_c = torch.tensor([-50.0, -50.0, -50.0, -50.0], dtype=dtype)
    ref_r = torch.tensor([-60.0, -60.0, -60.0, -60.0], dtype=dtype)
    shift_c = torch.tensor([big, -big, big, -big], dtype=dtype)
    shift_r = torch.tensor([-big, big, big, -big], dtype=dtype)
    pc = (ref_c + shift_c).detach().requires_grad_(True)
    pr = (ref_r + shift_r).detach().requires_grad_(True)
    lp = PairLogps(pc, pr, ref_c, ref_r, torch.tensor([10, 20, 30, 40]), torch.tensor([5, 5, 5, 5]))
    beta = 2.0 if base == "simpo" else 0.1
    for is_cfg in (None, {"enabled": True}, {"weight": "token_mean"}, {"self_normalize": True, "log_clip": None}):
        pc.grad = pr.grad = None
        out = build_loss(base, beta, importance_sampling=is_cfg)(lp)
        assert torch.isfinite(out.losses).all(), (is_cfg, out.losses)
        out.loss.backward()
        assert torch.isfinite(grad_of(pc)).all() and torch.isfinite(grad_of(pr)).all(), is_cfg
        for k, v in out.metrics.items():
            assert torch.isfinite(v), (k, is_cfg)
    # log w = shift_c + shift_r = [0, 0, +2e4, -2e4] (bf16 rounding of the inputs moves the
    # first two by a few tens, still far below the cap)
    w, m = importance_weights(lp, log_clip=2.0)
    assert w[2].item() == pytest.approx(math.exp(2.0))
    assert w[3].item() == 0.0
    assert m["is/log_weight_raw_max"].item() > 1.9e4
    assert m["is/weight_raw_max"].item() == pytest.approx(math.exp(80.0), rel=1e-5)  # reported capped
    assert m["is/frac_clipped"].item() == 0.25
    assert 1.0 <= m["is/ess"].item() <= 4.0


def test_no_clip_overflows_only_where_asked():
    """log_clip = None is the exact (unclipped) weight: it overflows to inf for log w = 2e4 in fp32
    (documented), while the diagnostics stay finite."""
    lp = PairLogps(t(1e4), t(1e4), t(0.0), t(0.0))
    w, m = importance_weights(lp, log_clip=None)
    assert math.isinf(w.item())
    assert all(torch.isfinite(v) for v in m.values())


# ------------------------------------------------------------------------------------------
# Gradients against finite differences (float64 gradcheck)
# ------------------------------------------------------------------------------------------

IS_PAPER = {"enabled": True, "log_clip": 0.3}  # some of the frozen log-weights below are clipped
IS_OPTIONS = [
    {"enabled": True, "log_clip": None},
    {"enabled": True, "weight": "token_mean"},
    {"enabled": True, "lower_log_clip": -0.5},
    {"enabled": True, "self_normalize": True},
]
# every base loss bare and with the paper's IS; every other IS option on DPO (the weight
# enters every base loss the same way, so the cross product would add time, not coverage)
GRADCHECK_CASES = (
    [(b, None) for b in sorted(LOSSES)]
    + [(b, IS_PAPER) for b in sorted(LOSSES)]
    + [("dpo", c) for c in IS_OPTIONS]
)


def _case_id(case) -> str:
    base, cfg = case
    return base if cfg is None else base + "-IS-" + "-".join(f"{k}={v}" for k, v in cfg.items() if k != "enabled")


@pytest.mark.parametrize("base, is_cfg", GRADCHECK_CASES, ids=[_case_id(c) for c in GRADCHECK_CASES])
def test_gradcheck(base, is_cfg):
    """torch.autograd.gradcheck of loss and losses w.r.t. all four log-prob inputs, float64.

    The IS weight is a constant by design (stopgrad), so finite differences of the full
    function (which move w) would not match. To check the IS variants against finite
    differences anyway, behaviour log-probs are set to `policy.detach() - c`: then
    log w = c is constant in value under the perturbation and carries no graph, i.e. the
    weight is frozen at w(c) and finite differences see exactly w(c) * f.
    """
    beta = 2.0 if base == "simpo" else 0.3
    lp0 = random_batch(B=3, seed=2, grad=False)
    c_w = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64)
    c_l = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
    loss = build_loss(base, beta, importance_sampling=is_cfg)

    def fn(pc, pr, rc, rr):
        lp = PairLogps(pc, pr, rc, rr, lp0.chosen_lengths, lp0.rejected_lengths)
        if is_cfg is not None:
            lp.behavior_chosen = pc.detach() - c_w
            lp.behavior_rejected = pr.detach() - c_l
        out = loss(lp)
        return out.loss, out.losses

    inputs = tuple(
        x.detach().clone().requires_grad_(True)
        for x in (lp0.policy_chosen, lp0.policy_rejected, lp0.ref_chosen, lp0.ref_rejected)
    )
    # full Jacobian for the base losses; for IS variants (a frozen weight times a base loss
    # checked in full) the cheaper random-projection check of torch's fast_mode suffices
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=is_cfg is not None)


def test_gradcheck_chipo_with_binding_clip():
    """chi-PO with a cap low enough to bind (log_ratio_clip = 0.05; r in the batch spans both
    sides): above the cap the exp term is constant, so only the log term's gradient remains."""
    loss = build_loss("chipo", 0.3, {"log_ratio_clip": 0.05})
    lp0 = random_batch(B=4, seed=3, grad=False)
    r = torch.cat([lp0.policy_chosen - lp0.ref_chosen, lp0.policy_rejected - lp0.ref_rejected])
    assert (r > 0.05).any() and (r < 0.05).any()

    def fn(pc, pr):
        return loss(PairLogps(pc, pr, lp0.ref_chosen, lp0.ref_rejected)).losses

    inputs = (lp0.policy_chosen.clone().requires_grad_(True), lp0.policy_rejected.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Validation messages
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base="foo", beta=0.1), "loss.base='foo' is not a known loss; available: " + ", ".join(sorted(LOSSES))),
        (dict(base="dpo", beta=-0.1), "beta must be > 0 (got -0.1)"),
        (dict(base="dpo", beta=0), "beta must be > 0 (got 0)"),
        (dict(base="dpo", beta="0.1"), "beta must be a finite number > 0 (got '0.1')"),
        (dict(base="dpo", beta=float("nan")), "beta must be a finite number > 0 (got nan)"),
        (dict(base="dpo", beta=0.1, params={"foo": 1}), "loss.params.foo is not a parameter of dpo; allowed: label_smoothing"),
        (dict(base="ipo", beta=0.1, params={"label_smoothing": 0.1}), "loss.params.label_smoothing is not a parameter of ipo; allowed: none (ipo takes no parameters)"),
        (dict(base="simpo", beta=2, params={"gamma": 1}), "loss.params.gamma is not a parameter of simpo; allowed: gamma_beta_ratio"),
        (dict(base="dpo", beta=0.1, params={"label_smoothing": 0.5}), "loss.params.label_smoothing must be in [0, 0.5) (got 0.5)"),
        (dict(base="dpo", beta=0.1, params={"label_smoothing": -0.1}), "loss.params.label_smoothing must be in [0, 0.5) (got -0.1)"),
        (dict(base="rpo", beta=0.1, params={"eta": -1}), "loss.params.eta must be >= 0 (got -1)"),
        (dict(base="chipo", beta=0.1, params={"log_ratio_clip": 0}), "loss.params.log_ratio_clip must be > 0 or null (got 0)"),
        (dict(base="simpo", beta=2, params={"gamma_beta_ratio": -0.5}), "loss.params.gamma_beta_ratio must be >= 0 (got -0.5)"),
        (dict(base="rdpo", beta=0.1, params={"alpha": "big"}), "loss.params.alpha must be a finite number (got 'big')"),
        (dict(base="dpo", beta=0.1, params=[1]), "loss.params must be a mapping of parameter names to values (got [1])"),
        (dict(base="dpo", beta=0.1, importance_sampling={"log_clip": -1}), "loss.importance_sampling.log_clip must be >= 0 or null (got -1)"),
        (dict(base="dpo", beta=0.1, importance_sampling={"enabled": False, "log_clip": -1}), "loss.importance_sampling.log_clip must be >= 0 or null (got -1)"),
        (dict(base="dpo", beta=0.1, importance_sampling={"weight": "x"}), "loss.importance_sampling.weight='x' is not a weighting; allowed: sequence, token_mean"),
        (dict(base="dpo", beta=0.1, importance_sampling={"log_clip": 1.0, "lower_log_clip": 2.0}), "loss.importance_sampling.lower_log_clip (2.0) must be <= loss.importance_sampling.log_clip (1.0)"),
        (dict(base="dpo", beta=0.1, importance_sampling={"lower_log_clip": "low"}), "loss.importance_sampling.lower_log_clip must be a number or null (got 'low')"),
        (dict(base="dpo", beta=0.1, importance_sampling={"self_normalize": 1}), "loss.importance_sampling.self_normalize must be true or false (got 1)"),
        (dict(base="dpo", beta=0.1, importance_sampling={"enabled": "yes"}), "loss.importance_sampling.enabled must be true or false (got 'yes')"),
        (dict(base="dpo", beta=0.1, importance_sampling={"clip": 1}), "loss.importance_sampling.clip is not an option; allowed: enabled, log_clip, lower_log_clip, self_normalize, weight"),
        (dict(base="dpo", beta=0.1, importance_sampling=2.0), "loss.importance_sampling must be a mapping or null (got 2.0)"),
    ],
)
def test_build_loss_validation(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build_loss(**kwargs)


def test_importance_weights_validates_its_options():
    with pytest.raises(ValueError, match=re.escape("loss.importance_sampling.weight='tok' is not a weighting")):
        importance_weights(is_batch(), weight="tok")
    with pytest.raises(ValueError, match=re.escape("loss.importance_sampling.log_clip must be >= 0 or null (got -2)")):
        importance_weights(is_batch(), log_clip=-2)


def _strip(lp: PairLogps, *names: str) -> PairLogps:
    for n in names:
        setattr(lp, n, None)
    return lp


@pytest.mark.parametrize(
    "base, is_cfg, strip, message",
    [
        ("dpo", None, ("ref_chosen", "ref_rejected"), "loss.base='dpo' needs reference log-probs, but PairLogps.ref_chosen/ref_rejected are None (reference-free losses: sft, simpo)"),
        ("chipo", None, ("ref_chosen", "ref_rejected"), "loss.base='chipo' needs reference log-probs"),
        ("rdpo", None, ("chosen_lengths", "rejected_lengths"), "loss.base='rdpo' needs response lengths, but PairLogps.chosen_lengths/rejected_lengths are None"),
        ("simpo", None, ("chosen_lengths", "rejected_lengths"), "loss.base='simpo' needs response lengths"),
        ("sft", None, ("chosen_lengths", "rejected_lengths"), "loss.base='sft' needs response lengths"),
        ("dpo", {"weight": "token_mean"}, ("chosen_lengths", "rejected_lengths"), "loss.importance_sampling.weight='token_mean' needs response lengths"),
        ("simpo", {"enabled": True}, ("ref_chosen", "ref_rejected"), "loss.importance_sampling.enabled=true needs the behaviour policy's log-probs"),
        ("dpo", None, ("ref_rejected",), "PairLogps.ref_chosen and PairLogps.ref_rejected (reference log-probs) must be given together"),
    ],
)
def test_call_time_validation(base, is_cfg, strip, message):
    loss = build_loss(base, 0.1, importance_sampling=is_cfg)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        loss(_strip(hand_batch(), *strip))


def test_shape_mismatch_is_rejected():
    lp = hand_batch()
    lp.ref_chosen = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("PairLogps.ref_chosen has shape (3,) but policy_chosen has (2,)")):
        build_loss("dpo", 0.1)(lp)


def test_daaloss_attributes():
    loss = build_loss("simpo", 2.0, {"gamma_beta_ratio": 0.3}, {"enabled": True, "weight": "token_mean"})
    assert isinstance(loss, DAALoss)
    assert loss.base == "simpo" and loss.beta == 2.0
    assert loss.params == {"gamma_beta_ratio": 0.3}
    assert loss.importance_sampling == ISConfig(log_clip=2.0, weight="token_mean")
    assert not loss.needs_reference and loss.needs_lengths
    assert build_loss("dpo", 0.1).params == {"label_smoothing": 0.0}
    assert build_loss("dpo", 0.1, importance_sampling={"enabled": False}).importance_sampling is None
    assert build_loss("dpo", 0.1, importance_sampling={"log_clip": 1}).importance_sampling == ISConfig(log_clip=1.0)
    assert build_loss("dpo", 0.1).needs_reference and not build_loss("dpo", 0.1).needs_lengths
    assert build_loss("dpo", 0.1, importance_sampling={"weight": "token_mean"}).needs_lengths


# ------------------------------------------------------------------------------------------
# conf/loss/*.yaml: every file loads, has the agreed shape, and builds
# ------------------------------------------------------------------------------------------

LOSS_FILES = sorted(CONF_LOSS.glob("*.yaml"))
IS_KEYS = {"enabled", "log_clip", "weight", "lower_log_clip", "self_normalize"}


def test_loss_config_folder_has_the_expected_choices():
    """Every base loss has its file (test_registry_is_complete), and the paper's methods and online training
    theirs: its IS variants of DPO, IPO and SLiC, and online DPO and IPO (docs/method.md)."""
    names = {p.stem for p in LOSS_FILES}
    assert set(LOSSES) | {"isdpo", "isipo", "isslic", "online_dpo", "online_ipo"} <= names


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.stem)
def test_loss_config_loads_and_builds(path):
    text = path.read_text()
    assert text.startswith("# "), "first line: a comment naming the method and its paper"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "- ", "defaults:")):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"
    cfg = compose_cfg([f"loss={path.stem}"]).loss  # as composed: files extend a schema or another loss
    assert set(cfg) == {"name", "base", "params", "importance_sampling", "online"}
    assert cfg.name == path.stem
    assert cfg.online == cfg.name.startswith("online_")  # pairs sampled from the policy each step (isdpo.online)
    assert set(cfg.importance_sampling) == IS_KEYS
    assert cfg.importance_sampling.enabled == cfg.name.startswith("is")
    fn = LOSSES[cfg.base]
    allowed = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(cfg.params) == allowed, "list every parameter of the base loss"
    beta = 2.0 if cfg.base == "simpo" else 0.1
    loss = build_loss(cfg.base, beta, cfg.params, cfg.importance_sampling)
    assert (loss.importance_sampling is not None) == cfg.importance_sampling.enabled
    out = loss(random_batch(dtype=torch.float32))
    assert torch.isfinite(out.loss)
    # a command-line override reaches every loss, IS on or off
    cfg2 = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["importance_sampling.log_clip=1", "importance_sampling.enabled=true"]))
    loss2 = build_loss(cfg2.base, beta, cfg2.params, cfg2.importance_sampling)
    assert loss2.importance_sampling.log_clip == 1.0
