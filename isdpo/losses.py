"""Losses of direct alignment algorithms (DAAs) and their importance-sampled versions (IS-DAA, Nguyen et al. 2025,
"Mitigating Reward Over-optimization in Direct Alignment Algorithms with Importance Sampling", arXiv 2506.08681).

Every loss is a pure function of per-pair *sequence* log-probabilities (tensors of shape [B]), registered in
:data:`LOSSES`; nothing here knows about models, Lightning or Hydra. :func:`importance_weights` multiplies any of
them by the detached, clipped pair ratio, and :func:`build_loss` builds from the config the :class:`DAALoss` the
training module calls on a :class:`PairLogps`. Derivations, the paper's protocol and the options that are NOT
the paper's: docs/method.md (sections 2 to 4).

Notation (used in every docstring below)::

    x, y_w, y_l   prompt, chosen ("winning") and rejected ("losing") response
    log pi(y)     log pi_theta(y|x), summed over the response tokens (no length normalisation,
                  as in the IS-DAA paper's released code)
    r_w, r_l      log pi(y_w) - log pi_ref(y_w),  log pi(y_l) - log pi_ref(y_l)
    rho           r_w - r_l                (the DPO "logits")
    |y|           number of response tokens of y
    f             a base DAA's per-pair loss; the batch loss is its mean over the pairs

Inputs in bf16/fp16/fp32 are computed in fp32 (float64 stays float64, for gradcheck); with the default clips,
sequence log-ratios of +-1e4 still give finite losses, gradients and metrics. Metric names follow TRL's
DPOTrainer ("rewards/chosen", ...); the importance-sampling diagnostics live under "is/".
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from isdpo.schema import ImportanceSampling

__all__ = [
    "PairLogps",
    "LossOutput",
    "ISConfig",
    "LOSSES",
    "dpo_loss",
    "ipo_loss",
    "slic_loss",
    "rpo_loss",
    "chipo_loss",
    "rdpo_loss",
    "sft_loss",
    "simpo_loss",
    "importance_weights",
    "DAALoss",
    "build_loss",
]


# --------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------


@dataclass
class PairLogps:
    """Per-pair sequence log-probabilities, each of shape [B] (one entry per preference pair).

    policy_chosen/policy_rejected: log pi_theta(y_w|x), log pi_theta(y_l|x), summed over the
        response tokens; these carry the gradient.
    ref_chosen/ref_rejected: log pi_ref(y|x); None only for reference-free losses (simpo, sft).
    chosen_lengths/rejected_lengths: number of response tokens |y| (>= 1); needed by rdpo, simpo,
        sft and by the token_mean importance weight.
    behavior_chosen/behavior_rejected: log mu(y|x) of the policy that generated the pairs, when
        the data set carries them; importance sampling then uses mu instead of pi_ref.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    behavior_chosen: Tensor | None = None
    behavior_rejected: Tensor | None = None


@dataclass
class LossOutput:
    """What a :class:`DAALoss` returns.

    loss: scalar to backpropagate, ``losses.mean()`` (= sum(w f)/sum(w) when self-normalised,
        because then ``losses`` already carry the normalised weight B*w/sum(w)).
    losses: [B] per-pair loss with the importance weight applied (w f), or f without IS.
    chosen_rewards/rejected_rewards: [B] detached implicit rewards, beta*(log pi - log pi_ref);
        for reference-free losses beta * log pi / |y| (SimPO's reward).
    metrics: detached scalars (see :meth:`DAALoss.__call__`).
    weights: [B] detached weight that multiplied f (after clipping and normalisation), or None
        without importance sampling.
    base_losses: [B] detached f, the base loss before the weight (logged as ``train/base_loss`` beside ``loss``,
        which is what is optimised), or None without importance sampling.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]
    weights: Tensor | None = None
    base_losses: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_PAIRED_FIELDS = (
    ("ref_chosen", "ref_rejected", "reference log-probs"),
    ("chosen_lengths", "rejected_lengths", "response lengths"),
    ("behavior_chosen", "behavior_rejected", "behaviour log-probs"),
)

# Reported weights are exp(log value) with the log capped here: a raw sequence weight can be
# exp(1e4), which is inf in any float type, and dashboards choke on inf. The exact size is kept
# in log space ("is/log_weight_raw_max").
_METRIC_LOG_CAP = 80.0


def _compute_dtype(logps: PairLogps) -> torch.dtype:
    # bf16 has 8 mantissa bits: beta*rho, exp(r) or (rho - c)^2 in bf16 lose the margin or
    # overflow, so low precision is upcast. float64 is kept so gradcheck sees exact arithmetic.
    for f in fields(logps):
        t = getattr(logps, f.name)
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _cast(logps: PairLogps) -> PairLogps:
    """Copy of ``logps`` with every tensor (lengths too) in the compute dtype; checks shapes/pairs."""
    shape = logps.policy_chosen.shape
    for f in fields(logps):
        t = getattr(logps, f.name)
        if t is not None and t.shape != shape:
            raise ValueError(
                f"PairLogps.{f.name} has shape {tuple(t.shape)} but policy_chosen has "
                f"{tuple(shape)}; all fields must be per-pair tensors of the same shape"
            )
    for a, b, what in _PAIRED_FIELDS:
        if (getattr(logps, a) is None) != (getattr(logps, b) is None):
            raise ValueError(f"PairLogps.{a} and PairLogps.{b} ({what}) must be given together")
    dtype = _compute_dtype(logps)
    return PairLogps(
        **{f.name: (None if (t := getattr(logps, f.name)) is None else t.to(dtype)) for f in fields(logps)}
    )


def _need_ref(lp: PairLogps, who: str) -> None:
    if lp.ref_chosen is None:
        free = ", ".join(n for n in sorted(LOSSES) if not LOSSES[n].needs_reference)
        raise ValueError(
            f"{who} needs reference log-probs, but PairLogps.ref_chosen/ref_rejected are None "
            f"(reference-free losses: {free})"
        )


def _need_lengths(lp: PairLogps, who: str) -> None:
    if lp.chosen_lengths is None:
        raise ValueError(
            f"{who} needs response lengths, but PairLogps.chosen_lengths/rejected_lengths are None"
        )


def _ref_rewards(lp: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    return (
        (beta * (lp.policy_chosen - lp.ref_chosen)).detach(),
        (beta * (lp.policy_rejected - lp.ref_rejected)).detach(),
    )


def _log_ratios(lp: PairLogps) -> tuple[Tensor, Tensor]:
    """(r_w, r_l): the policy's log-ratios to the reference on the chosen and the rejected response."""
    return lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected


def _rho(lp: PairLogps) -> Tensor:
    """rho = r_w - r_l, the DPO "logits"."""
    r_w, r_l = _log_ratios(lp)
    return r_w - r_l


def _length_normalised_rewards(lp: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    return (
        (beta * lp.policy_chosen / lp.chosen_lengths).detach(),
        (beta * lp.policy_rejected / lp.rejected_lengths).detach(),
    )


def _prepare(logps: PairLogps, name: str) -> PairLogps:
    lp = _cast(logps)
    fn = LOSSES[name]
    if fn.needs_reference:
        _need_ref(lp, f"loss.base={name!r}")
    if fn.needs_lengths:
        _need_lengths(lp, f"loss.base={name!r}")
    return lp


LossFn = Callable[..., "tuple[Tensor, Tensor, Tensor]"]

#: Base-loss registry: name -> pure function ``fn(logps, beta, **params) -> (f, chosen_rewards,
#: rejected_rewards)``. Each function carries ``needs_reference`` and ``needs_lengths``
#: attributes; its keyword-only arguments (with defaults) are the allowed ``loss.params``.
LOSSES: dict[str, LossFn] = {}


def _register(name: str, *, needs_reference: bool = True, needs_lengths: bool = False):
    def deco(fn):
        fn.needs_reference = needs_reference
        fn.needs_lengths = needs_lengths
        LOSSES[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# Base losses. Each returns (per-pair loss f [B], chosen_rewards [B], rejected_rewards [B]).
# --------------------------------------------------------------------------------------------


@_register("dpo")
def dpo_loss(logps: PairLogps, beta: float, *, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), optionally conservative (cDPO).

    ::

        f = -(1 - eps) * log sigmoid(beta * rho) - eps * log sigmoid(-beta * rho)

    ``eps = label_smoothing`` in [0, 0.5) is the assumed probability that a preference label is
    flipped (conservative DPO, E. Mitchell 2023, "A note on DPO with noisy preferences and
    relationship to IPO"; TRL's ``label_smoothing``). eps = 0 is DPO, the IS-DAA paper's
    f(u) = -log sigmoid(u).
    """
    lp = _prepare(logps, "dpo")
    u = beta * _rho(lp)
    f = -(1.0 - label_smoothing) * F.logsigmoid(u)
    if label_smoothing:
        f = f - label_smoothing * F.logsigmoid(-u)
    return (f, *_ref_rewards(lp, beta))


@_register("ipo")
def ipo_loss(logps: PairLogps, beta: float):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036), the sampled squared loss::

        f = (rho - 1/(2 beta))^2

    beta plays the role of the paper's tau. rho uses summed sequence log-probs, as the IS-DAA
    paper (arXiv 2506.08681) does; TRL's ``loss_type="ipo"`` averages log-probs over tokens
    instead, so the two differ by the length scale.
    """
    lp = _prepare(logps, "ipo")
    rho = _rho(lp)
    f = (rho - 1.0 / (2.0 * beta)) ** 2
    return (f, *_ref_rewards(lp, beta))


@_register("slic")
def slic_loss(logps: PairLogps, beta: float):
    """SLiC / hinge (Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425), in the reference-corrected
    form used by the IS-DAA paper and TRL's ``loss_type="hinge"``::

        f = max(0, 1 - beta * rho)

    Zhao et al.'s calibration loss max(0, delta - log pi(y_w) + log pi(y_l)) has no reference
    term; here the margin is on rho and delta = 1 in units of beta*rho (a margin of 1/beta on
    rho). SLiC-HF's separate cross-entropy regulariser is not included. The hinge is not
    differentiable at beta*rho = 1 (torch takes gradient 0 there).
    """
    lp = _prepare(logps, "slic")
    rho = _rho(lp)
    f = torch.relu(1.0 - beta * rho)
    return (f, *_ref_rewards(lp, beta))


@_register("rpo")
def rpo_loss(logps: PairLogps, beta: float, *, eta: float = 0.005):
    """RPO: DPO plus an SFT term on the chosen response (IS-DAA paper's baseline, arXiv 2506.08681
    section 5; the form of Liu et al. 2024, arXiv 2405.16436)::

        f = -log sigmoid(beta * rho) - beta * eta * log pi(y_w|x)         (eta = 0.005)

    with log pi(y_w|x) summed over tokens. Pang et al. 2024 (arXiv 2404.19733, TRL's
    ``rpo_alpha``) use a length-normalised NLL without the beta factor instead; see
    docs/method.md#rpo.
    """
    lp = _prepare(logps, "rpo")
    u = beta * _rho(lp)
    f = -F.logsigmoid(u) - beta * eta * lp.policy_chosen
    return (f, *_ref_rewards(lp, beta))


@_register("chipo")
def chipo_loss(logps: PairLogps, beta: float, *, log_ratio_clip: float | None = 10.0):
    """chi-PO (Huang et al. 2024, "Correcting the Mythos of KL-Regularization: Direct Alignment
    without Overoptimization via Chi-Squared Preference Optimization", arXiv 2407.13399).

    DPO with the link phi(z) = z + log z applied to the ratio z = pi/pi_ref, i.e. the implicit
    reward beta*phi(pi/pi_ref) = beta*(r + exp(r))::

        f = -log sigmoid(beta * [(r_w - r_l) + exp(min(r_w, c)) - exp(min(r_l, c))])

    ``c = log_ratio_clip`` (default 10) caps each log-ratio before exp, for stability (fp32 exp
    overflows near r = 88 and inf - inf is nan); above it the exp term is constant and only the
    log term acts. ``null`` disables the cap. Huang et al.'s own clip of the whole argument to
    [-2 R_max, 2 R_max] is not implemented. See docs/method.md#chi-po.
    """
    lp = _prepare(logps, "chipo")
    r_w, r_l = _log_ratios(lp)
    if log_ratio_clip is not None:
        e_w, e_l = torch.exp(r_w.clamp(max=log_ratio_clip)), torch.exp(r_l.clamp(max=log_ratio_clip))
    else:
        e_w, e_l = torch.exp(r_w), torch.exp(r_l)
    f = -F.logsigmoid(beta * ((r_w - r_l) + e_w - e_l))
    return (f, *_ref_rewards(lp, beta))


@_register("rdpo", needs_lengths=True)
def rdpo_loss(logps: PairLogps, beta: float, *, alpha: float = 0.01):
    """R-DPO, length-regularised DPO (Park et al. 2024, "Disentangling Length from Quality in
    Direct Preference Optimization", arXiv 2403.19159)::

        f = -log sigmoid(beta * rho + alpha * (|y_w| - |y_l|))          (alpha = 0.01)

    The "+" follows from Park et al.'s length-penalised objective (the IS-DAA paper's released
    code adds it too): a longer chosen response already explains part of the label, so the pair
    pushes less. ``alpha < 0`` gives the other sign. Derivation: docs/method.md#r-dpo.
    """
    lp = _prepare(logps, "rdpo")
    rho = _rho(lp)
    f = -F.logsigmoid(beta * rho + alpha * (lp.chosen_lengths - lp.rejected_lengths))
    return (f, *_ref_rewards(lp, beta))


@_register("sft", needs_reference=False, needs_lengths=True)
def sft_loss(logps: PairLogps, beta: float):
    """SFT on the chosen responses: per-token mean negative log-likelihood of y_w::

        f = -log pi(y_w|x) / |y_w|

    Each pair (sequence) counts equally in the batch mean; this is not the token-weighted mean
    sum(NLL)/sum(|y_w|) of a causal-LM trainer, which weights long responses more. beta is
    unused by the loss (it only scales the logged rewards). The rejected response is ignored.
    Rewards: beta*(log pi - log pi_ref) when reference log-probs are given, else beta*log pi/|y|.
    """
    lp = _prepare(logps, "sft")
    f = -lp.policy_chosen / lp.chosen_lengths
    rewards = _ref_rewards(lp, beta) if lp.ref_chosen is not None else _length_normalised_rewards(lp, beta)
    return (f, *rewards)


@_register("simpo", needs_reference=False, needs_lengths=True)
def simpo_loss(logps: PairLogps, beta: float, *, gamma_beta_ratio: float = 0.5):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv 2405.14734): reference-free, length-normalised rewards and a target margin::

        f = -log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma),
        gamma = beta * gamma_beta_ratio                                 (ratio = 0.5)

    Parameterised by gamma/beta like the SimPO reference code (princeton-nlp/SimPO,
    ``gamma_beta_ratio``). Note TRL's CPOTrainer takes gamma itself (``simpo_gamma``, default
    0.5), so "0.5" means different margins in the two. SimPO's paper uses beta ~ 2-2.5, far
    larger than DPO's beta. Rewards are SimPO's: beta * log pi(y)/|y|.
    """
    lp = _prepare(logps, "simpo")
    avg_w = lp.policy_chosen / lp.chosen_lengths
    avg_l = lp.policy_rejected / lp.rejected_lengths
    f = -F.logsigmoid(beta * (avg_w - avg_l) - beta * gamma_beta_ratio)
    return (f, *_length_normalised_rewards(lp, beta))


# --------------------------------------------------------------------------------------------
# Importance sampling (Nguyen et al. 2025, arXiv 2506.08681)
# --------------------------------------------------------------------------------------------

_IS_WEIGHTINGS = ("sequence", "token_mean")
_IS_KEYS = tuple(f.name for f in fields(ImportanceSampling))


@dataclass(frozen=True)
class ISConfig:
    """Validated importance-sampling options of a :class:`DAALoss` (see :func:`importance_weights`); the defaults
    are the config's (isdpo.schema.ImportanceSampling)."""

    log_clip: float | None = ImportanceSampling.log_clip
    weight: str = ImportanceSampling.weight
    lower_log_clip: float | None = ImportanceSampling.lower_log_clip
    self_normalize: bool = ImportanceSampling.self_normalize


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_is_options(log_clip, weight, lower_log_clip, self_normalize) -> None:
    key = "loss.importance_sampling"
    if log_clip is not None and not (_is_number(log_clip) and log_clip >= 0):
        raise ValueError(f"{key}.log_clip must be >= 0 or null (got {log_clip!r})")
    if weight not in _IS_WEIGHTINGS:
        raise ValueError(f"{key}.weight={weight!r} is not a weighting; allowed: {', '.join(_IS_WEIGHTINGS)}")
    if lower_log_clip is not None and not _is_number(lower_log_clip):
        raise ValueError(f"{key}.lower_log_clip must be a number or null (got {lower_log_clip!r})")
    if log_clip is not None and lower_log_clip is not None and lower_log_clip > log_clip:
        raise ValueError(
            f"{key}.lower_log_clip ({lower_log_clip}) must be <= {key}.log_clip ({log_clip})"
        )
    if not isinstance(self_normalize, bool):
        raise ValueError(f"{key}.self_normalize must be true or false (got {self_normalize!r})")


def _capped_exp(log_value: Tensor) -> Tensor:
    return log_value.clamp(max=_METRIC_LOG_CAP).exp()


def _is_metrics(log_w_raw: Tensor, log_w: Tensor) -> dict[str, Tensor]:
    n = log_w_raw.numel()
    log_n = math.log(n)
    lse = torch.logsumexp(log_w, 0)
    # ESS = (sum w)^2 / sum w^2 = exp(2 LSE(log w) - LSE(2 log w)): scale-free, so it is finite
    # even when every weight is exp(+-1e4), and the same before and after self-normalisation.
    ess = torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0))
    return {
        "is/weight_raw_mean": _capped_exp(torch.logsumexp(log_w_raw, 0) - log_n),
        "is/weight_raw_max": _capped_exp(log_w_raw.max()),
        "is/log_weight_raw_mean": log_w_raw.mean(),
        "is/log_weight_raw_max": log_w_raw.max(),
        "is/weight_mean": _capped_exp(lse - log_n),
        "is/weight_max": _capped_exp(log_w.max()),
        "is/frac_clipped": (log_w != log_w_raw).to(log_w.dtype).mean(),
        "is/ess": ess,
        "is/ess_frac": ess / n,
    }


def importance_weights(
    logps: PairLogps,
    *,
    log_clip: float | None = ISConfig.log_clip,
    weight: str = ISConfig.weight,
    lower_log_clip: float | None = ISConfig.lower_log_clip,
    self_normalize: bool = ISConfig.self_normalize,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached, clipped pair importance weights of IS-DAA (Nguyen et al. 2025, arXiv 2506.08681).

    The paper's weight (``weight="sequence"``) is the pair ratio, the product of the chosen and
    the rejected sequence ratios (every token ratio of both responses), in log space::

        log w  = [log pi(y_w) - log mu(y_w)] + [log pi(y_l) - log mu(y_l)]
        w_clip = exp(min(log w, log_clip))                    (one-sided, clipped before exp)

    mu is the behaviour policy: ``PairLogps.behavior_*`` when given, else the reference
    (pairs sampled from pi_ref). The weight is detached: no gradient flows through it. Without a
    clip, E_mu[w f] = E_{pi x pi}[f] (the paper's Thm. 1, appendix B.1: unbiased online DPO);
    the clip trades bias for variance. See docs/method.md#3-theory-and-the-tests-that-check-it.

    log_clip: cap on log w. Default 2.0 = the released run scripts (written there as 2*eps with
        eps = 1.0; the code's own default eps = 0.25 would give 0.5). ``None``: no clip
        (exp(log w) may overflow to inf; meant for exactness tests such as the unbiasedness
        identity).
    weight: ``"sequence"`` (the paper's) or ``"token_mean"``: log w / (|y_w| + |y_l|), the mean
        token log ratio over both responses; NOT the paper's (a length-normalised variant that
        is far less prone to a whole batch collapsing to ~0 weight). Clips apply after the
        division.
    lower_log_clip: NOT the paper's. Also floors log w (two-sided clip); ``None`` = no floor.
    self_normalize: NOT the paper's. Returns B * w / sum(w) over the batch, so that the
        batch mean of w f equals sum(w f)/sum(w). Computed as B*softmax(log w), finite even
        without a clip. Normalises within the tensors passed (a micro-batch under gradient
        accumulation or one rank under DDP), not the global batch.

    Returns ``(w, metrics)``: w [B] detached, in the compute dtype (fp32, or float64 for float64
    inputs); metrics are detached scalars, computed in log space so they are never nan::

        is/weight_raw_mean, is/weight_raw_max     before clipping (values above e^80 shown as e^80)
        is/log_weight_raw_mean, is/log_weight_raw_max   mean and max of log w before clipping
        is/weight_mean, is/weight_max             after clipping, before self-normalisation
        is/frac_clipped                           fraction of pairs changed by either clip
        is/ess, is/ess_frac                       (sum w)^2 / sum w^2 with clipped w, and ess / B
    """
    _validate_is_options(log_clip, weight, lower_log_clip, self_normalize)
    lp = _cast(logps)
    if lp.behavior_chosen is not None:
        mu_w, mu_l = lp.behavior_chosen, lp.behavior_rejected
    elif lp.ref_chosen is not None:
        mu_w, mu_l = lp.ref_chosen, lp.ref_rejected
    else:
        raise ValueError(
            "loss.importance_sampling.enabled=true needs the behaviour policy's log-probs "
            "(PairLogps.behavior_chosen/behavior_rejected) or, for mu = pi_ref, the reference "
            "log-probs (PairLogps.ref_chosen/ref_rejected); got neither"
        )
    log_w_raw = ((lp.policy_chosen - mu_w) + (lp.policy_rejected - mu_l)).detach()
    if weight == "token_mean":
        _need_lengths(lp, "loss.importance_sampling.weight='token_mean'")
        log_w_raw = log_w_raw / (lp.chosen_lengths + lp.rejected_lengths)
    log_w = log_w_raw
    if log_clip is not None:
        log_w = log_w.clamp(max=log_clip)
    if lower_log_clip is not None:
        log_w = log_w.clamp(min=lower_log_clip)
    if self_normalize:
        w = log_w.numel() * torch.softmax(log_w.flatten(), 0).view_as(log_w)
    else:
        w = log_w.exp()
    return w, _is_metrics(log_w_raw.flatten(), log_w.flatten())


# --------------------------------------------------------------------------------------------
# Config -> loss object
# --------------------------------------------------------------------------------------------


def _param_defaults(fn: LossFn) -> dict[str, object]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


# Range rules of base-loss parameters: (predicate, text after "must be"). A parameter not listed
# only has to be a finite number.
_PARAM_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 0.5, "in [0, 0.5)"),
    "eta": (lambda v: _is_number(v) and v >= 0, ">= 0"),
    "log_ratio_clip": (lambda v: v is None or (_is_number(v) and v > 0), "> 0 or null"),
    "gamma_beta_ratio": (lambda v: _is_number(v) and v >= 0, ">= 0"),
}


def _validate_params(base: str, params: Mapping | None) -> dict[str, object]:
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"loss.params must be a mapping of parameter names to values (got {params!r})")
    allowed = _param_defaults(LOSSES[base])
    out = dict(allowed)
    for k, v in params.items():
        if k not in allowed:
            names = ", ".join(allowed) if allowed else f"none ({base} takes no parameters)"
            raise ValueError(f"loss.params.{k} is not a parameter of {base}; allowed: {names}")
        ok, text = _PARAM_RULES.get(k, (_is_number, "a finite number"))
        if not ok(v):
            raise ValueError(f"loss.params.{k} must be {text} (got {v!r})")
        out[k] = float(v) if v is not None else None
    return out


def _validate_is(importance_sampling: Mapping | None) -> ISConfig | None:
    if importance_sampling is None:
        return None
    if not isinstance(importance_sampling, Mapping):
        raise ValueError(
            f"loss.importance_sampling must be a mapping or null (got {importance_sampling!r})"
        )
    for k in importance_sampling:
        if k not in _IS_KEYS:
            raise ValueError(
                f"loss.importance_sampling.{k} is not an option; allowed: {', '.join(sorted(_IS_KEYS))}"
            )
    # A mapping without `enabled` is taken to switch IS on: build_loss("dpo", 0.1,
    # importance_sampling={"log_clip": 1.0}) should not silently train plain DPO.
    enabled = importance_sampling.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"loss.importance_sampling.enabled must be true or false (got {enabled!r})")
    default = ISConfig()
    cfg = ISConfig(
        log_clip=importance_sampling.get("log_clip", default.log_clip),
        weight=importance_sampling.get("weight", default.weight),
        lower_log_clip=importance_sampling.get("lower_log_clip", default.lower_log_clip),
        self_normalize=importance_sampling.get("self_normalize", default.self_normalize),
    )
    # Validated even when disabled, so a typo in a command-line override fails at start-up.
    _validate_is_options(cfg.log_clip, cfg.weight, cfg.lower_log_clip, cfg.self_normalize)
    if not enabled:
        return None
    return ISConfig(
        log_clip=None if cfg.log_clip is None else float(cfg.log_clip),
        weight=cfg.weight,
        lower_log_clip=None if cfg.lower_log_clip is None else float(cfg.lower_log_clip),
        self_normalize=cfg.self_normalize,
    )


class DAALoss:
    """A base DAA loss with its parameters, optionally importance-weighted; built from config.

    ``DAALoss(base, beta, params, importance_sampling)`` validates its arguments exactly like
    :func:`build_loss` (which is the intended entry point). Calling it on a :class:`PairLogps`
    returns a :class:`LossOutput`::

        f = LOSSES[base](logps, beta, **params)[0]                      [B]
        w = importance_weights(logps, **importance_sampling) or 1       [B], detached
        losses = w * f;  loss = losses.mean()

    Attributes: ``base``, ``beta``, ``params`` (every parameter, defaults filled in),
    ``importance_sampling`` (:class:`ISConfig` or None when disabled), ``needs_reference``
    (the base loss needs pi_ref log-probs; with IS and no behaviour log-probs pi_ref is needed
    anyway, as mu) and ``needs_lengths``.

    Metrics (detached scalars; TRL's names): rewards/chosen, rewards/rejected, rewards/margins
    (means), rewards/accuracies (fraction with chosen reward > rejected reward), logps/chosen,
    logps/rejected (mean summed policy log-probs), plus the "is/..." metrics of
    :func:`importance_weights` when IS is on.
    """

    def __init__(
        self,
        base: str,
        beta: float,
        params: Mapping | None = None,
        importance_sampling: Mapping | None = None,
    ):
        if base not in LOSSES:
            raise ValueError(f"loss.base={base!r} is not a known loss; available: {', '.join(sorted(LOSSES))}")
        if not _is_number(beta):
            raise ValueError(f"beta must be a finite number > 0 (got {beta!r})")
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (got {beta})")
        self.base = base
        self.beta = float(beta)
        self.params = _validate_params(base, params)
        self.importance_sampling = _validate_is(importance_sampling)
        self._fn = LOSSES[base]

    @property
    def needs_reference(self) -> bool:
        return bool(self._fn.needs_reference)

    @property
    def needs_lengths(self) -> bool:
        is_tok = self.importance_sampling is not None and self.importance_sampling.weight == "token_mean"
        return bool(self._fn.needs_lengths) or is_tok

    def __repr__(self) -> str:
        return (
            f"DAALoss(base={self.base!r}, beta={self.beta}, params={self.params}, "
            f"importance_sampling={self.importance_sampling})"
        )

    def __call__(self, logps: PairLogps) -> LossOutput:
        f, chosen_rewards, rejected_rewards = self._fn(logps, self.beta, **self.params)
        dtype = f.dtype
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "logps/chosen": logps.policy_chosen.detach().to(dtype).mean(),
            "logps/rejected": logps.policy_rejected.detach().to(dtype).mean(),
        }
        weights = None
        losses = f
        if self.importance_sampling is not None:
            is_cfg = self.importance_sampling
            weights, is_metrics = importance_weights(
                logps,
                log_clip=is_cfg.log_clip,
                weight=is_cfg.weight,
                lower_log_clip=is_cfg.lower_log_clip,
                self_normalize=is_cfg.self_normalize,
            )
            losses = weights * f
            metrics.update(is_metrics)
        return LossOutput(
            loss=losses.mean(),
            losses=losses,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            metrics=metrics,
            weights=weights,
            base_losses=f.detach() if weights is not None else None,
        )


def build_loss(
    base: str,
    beta: float,
    params: Mapping | None = None,
    importance_sampling: Mapping | None = None,
) -> DAALoss:
    """Build a :class:`DAALoss` from the ``loss`` config group and the top-level ``beta``.

    Called as ``build_loss(cfg.loss.base, cfg.beta, cfg.loss.params, cfg.loss.importance_sampling)``.

    base: a key of :data:`LOSSES`.
    beta: > 0.
    params: keyword parameters of the base loss (the keyword-only arguments of its function);
        missing ones take the function's defaults; unknown names and out-of-range values are
        rejected.
    importance_sampling: None or a mapping with keys ``enabled`` (default true when the mapping
        is given), ``log_clip``, ``weight``, ``lower_log_clip``, ``self_normalize`` (see
        :func:`importance_weights`). Options are validated even when ``enabled`` is false.

    Every invalid value raises ValueError naming the config key and the allowed values. Input
    requirements that depend on the data (reference log-probs, lengths, behaviour log-probs)
    are checked when the loss is called.
    """
    return DAALoss(base, beta, params, importance_sampling)
