"""Statistics of a sweep report: Student-t intervals over seeds and over task instances, paired differences,
Holm's correction, the cross-fitted peak and drop of a curve, and the sentence each interval supports. Pure
functions of numbers (numpy, scipy.stats, statsmodels). Why these and how well they cover: docs/method.md §7.

- ``t_interval``: mean +- t_{n-1, 1-alpha/2} s / sqrt(n) over n values, with the two-sided p-value of the same t
  statistic against zero; no interval below 2 values.
- ``instances_interval``: task instances as a random sample: the mean of each instance's values, then
  ``t_interval`` across the K instance means (df K - 1); one instance: that instance's ``t_interval``.
- ``holm``: Holm's step-down adjusted p-values of a family (statsmodels ``multipletests``).
- ``sign_test``: the exact two-sided sign test over task instances (does a come out higher on more instances than
  chance allows?), which assumes nothing of how large or how alike the instance effects are.
- ``cross_fit``: peak and peak - final of a curve measured on two independent halves, the peak chosen on one half
  and read on the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean, its interval and the two-sided p-value against zero; ``low``/``high``/``p`` are NaN without an
    interval (n/a)."""

    mean: float
    low: float
    high: float
    n: int  # values used (finite ones), all instances together
    n_strata: int = 1  # instances behind the mean
    df: float = math.nan  # degrees of freedom of the t quantile
    p: float = math.nan

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def verdict(self) -> str:
        """"excludes zero", "includes zero" or "n/a" (no interval)."""
        if not self.defined:
            return "n/a"
        return "includes zero" if self.low <= 0.0 <= self.high else "excludes zero"


def finite(values: Sequence[float]) -> np.ndarray:
    """The finite values as a float array (None, NaN and inf dropped)."""
    out = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(out, dtype=float)


def t_interval(values: Sequence[float], *, level: float = LEVEL) -> Interval:
    """Mean of ``values`` and its Student-t interval, with the two-sided p-value of H0: mean = 0 (module
    docstring). Non-finite values are dropped; fewer than 2 values give no interval."""
    x = finite(values)
    if not len(x):
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    df = len(x) - 1
    se = float(x.std(ddof=1)) / math.sqrt(len(x))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    if se > 0:
        p = float(2 * scipy_stats.t.sf(abs(mean) / se, df))
    else:  # identical values: no spread, the mean is exact
        p = 1.0 if mean == 0 else 0.0
    return Interval(mean, mean - half, mean + half, len(x), 1, df, p)


def instances_interval(strata: Sequence[Sequence[float]], *, level: float = LEVEL) -> Interval:
    """Mean of the instance means and its t-interval across them (instances a random sample, df K - 1).

    Non-finite values are dropped and an instance without values is left out; one instance gives its own
    ``t_interval`` over its values (nothing varies across instances to generalise over).
    """
    kept = [x for x in (finite(s) for s in strata) if len(x)]
    if not kept:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    if len(kept) == 1:
        return t_interval(kept[0], level=level)
    across = t_interval([x.mean() for x in kept], level=level)
    return Interval(across.mean, across.low, across.high, sum(len(x) for x in kept), len(kept), across.df,
                    across.p)


def holm(p_values: Sequence[float], *, alpha: float = 1.0 - LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(Holm-adjusted p, rejected at ``alpha``) of a family; a NaN p (no test) stays NaN / not rejected and is not
    counted in the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted, rejected = np.full(p.shape, math.nan), np.zeros(p.shape, dtype=bool)
    tested = ~np.isnan(p)
    if tested.any():
        rejected[tested], adjusted[tested], _, _ = multipletests(p[tested], alpha=alpha, method="holm")
    return adjusted, rejected


def sign_test(n_higher: int, n_lower: int) -> float:
    """Two-sided p of the exact sign test, H0: an instance is as likely to favour a as b (the median instance effect
    is zero): Binomial(n_higher + n_lower, 1/2); instances with no difference are left out. NaN without any; with K
    instances it can be no smaller than 2^(1-K) (0.002 at K = 10)."""
    n = n_higher + n_lower
    return float(scipy_stats.binomtest(n_higher, n, 0.5).pvalue) if n else math.nan


def cross_fit(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(peak, peak - final) of a curve from two independent halves of its evaluation, A and B (same points):

        peak = 1/2 [B[argmax A] + A[argmax B]],   drop = 1/2 [(B[argmax A] - B[-1]) + (A[argmax B] - A[-1])]

    The step is chosen on one half and its value read on the other, so the noise that picked it does not inflate
    it (the first of tied maxima)."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ia, ib = int(np.argmax(xa)), int(np.argmax(xb))
    return 0.5 * (xb[ia] + xa[ib]), 0.5 * ((xb[ia] - xb[-1]) + (xa[ib] - xa[-1]))


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[dict, list, list]:
    """Paired differences ``a[k] - b[k]`` over the keys both have with finite values.

    Returns (key -> difference, keys only usable on the a side, keys only usable on the b side); a key whose
    value is missing or not finite on one side counts as unpaired on the other.
    """
    def ok(v) -> bool:
        return v is not None and math.isfinite(float(v))

    diffs = {k: float(a[k]) - float(b[k]) for k in a if k in b and ok(a[k]) and ok(b[k])}
    only_a = [k for k in a if k not in diffs and ok(a[k])]
    only_b = [k for k in b if k not in diffs and ok(b[k])]
    return diffs, only_a, only_b


def binned_curve(x: Sequence[float], y: Sequence[float], n_bins: int, *,
                 level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin mean x, bin mean y, band low, band high) over ``n_bins`` equal-count bins of the points sorted by x;
    the band is the t-interval of the bin's mean y, its points treated as independent.

    Points where x or y is not finite are dropped; fewer points than bins give one point per bin.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    if not len(xa):
        return (np.array([]),) * 4
    order = np.argsort(xa, kind="stable")
    chunks = [c for c in np.array_split(order, min(max(n_bins, 1), len(xa))) if len(c)]
    bx = np.array([xa[c].mean() for c in chunks])
    intervals = [t_interval(ya[c], level=level) for c in chunks]
    return (bx, np.array([i.mean for i in intervals]), np.array([i.low for i in intervals]),
            np.array([i.high for i in intervals]))


def default_bins(n_points: int, most: int = 10, per_bin: int = 4) -> int:
    """Number of quantile bins for ``n_points`` points: ``most`` (10) once there are enough for ``per_bin`` each."""
    return max(1, min(most, n_points // per_bin))


def interval_note(level: float = LEVEL) -> str:
    """How the intervals over seeds were computed, for a table's caption."""
    return f"{level:.0%} Student-t interval of the mean over seeds (df n - 1); n/a with one seed"


def format_p(p: float) -> str:
    """"p = 0.012", "p < 0.001", or "" without a test."""
    if math.isnan(p):
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def format_interval(interval: Interval, fmt: str = ".3f", signed: bool = False) -> str:
    """"0.612 [0.598, 0.627]" (``signed``: "+0.112 [+0.071, +0.150]"); "0.612 [n/a]" without an interval."""
    def num(v: float) -> str:
        if math.isnan(v):
            return "n/a"
        return f"{v:+{fmt}}" if signed else f"{v:{fmt}}"

    if math.isnan(interval.mean):
        return "–"
    bounds = f"[{num(interval.low)}, {num(interval.high)}]" if interval.defined else "[n/a]"
    return f"{num(interval.mean)} {bounds}"


def _direction(interval: Interval, a: str, b: str) -> str:
    if interval.verdict == "n/a":
        return "no interval: nothing shown"
    if interval.verdict == "includes zero":
        return "the interval includes zero: no difference shown"
    return f"the interval excludes zero: {a if interval.mean > 0 else b} higher"


def claim(context: str, a: str, b: str, metric: str, interval: Interval, *, fmt: str = ".3f",
          unit: str = "seeds", unpaired: int = 0) -> str:
    """One sentence: the mean paired difference a - b of ``metric`` over the seeds of one instance, its t-interval,
    p-value and what it shows (before any correction for multiple comparisons).

    e.g. "beta=0.01, chain_seed=1: isdpo - dpo final win rate +0.112 [+0.071, +0.150] (5 seeds, p = 0.002): the
    interval excludes zero: isdpo higher".
    """
    test = f", {format_p(interval.p)}" if interval.defined else ""
    head = f"{context}: {a} - {b} {metric} {format_interval(interval, fmt, signed=True)} ({interval.n} {unit}{test}"
    head += f"; {unpaired} unpaired run{'s' if unpaired != 1 else ''} left out)" if unpaired else ")"
    if interval.verdict == "n/a":
        why = "no pair" if interval.n == 0 else f"fewer than 2 {unit}"
        return f"{head}: no interval ({why}): nothing shown"
    return f"{head}: {_direction(interval, a, b)}"


def pooled_claim(context: str, a: str, b: str, metric: str, pooled: Interval, per_instance: Sequence[Interval], *,
                 fmt: str = ".3f", unpaired: int = 0) -> str:
    """One sentence for a comparison pooled over task instances: on how many instances a is higher (and how many
    instance intervals exclude zero on each side), then the mean of the instance means with its t-interval across
    instances (instances a random sample, df K - 1).

    e.g. "beta=0.01: isdpo - dpo final win rate: higher on 3 of 3 instances (interval above zero on 2, below on 0);
    pooled +0.125 [-0.050, +0.300] treating instances as random (K=3, p = 0.110): the interval includes zero: no
    difference shown".
    """
    means = [iv for iv in per_instance if not math.isnan(iv.mean)]
    higher, lower = sum(iv.mean > 0 for iv in means), sum(iv.mean < 0 for iv in means)
    above = sum(iv.defined and iv.low > 0 for iv in means)
    below = sum(iv.defined and iv.high < 0 for iv in means)
    counts = f"higher on {higher} of {len(means)} instances" + (f", lower on {lower}" if lower else "")
    counts += f" (interval above zero on {above}, below on {below})"
    test = f", {format_p(pooled.p)}" if pooled.defined else ""
    left = f"; {unpaired} unpaired run{'s' if unpaired != 1 else ''} left out" if unpaired else ""
    return (f"{context}: {a} - {b} {metric}: {counts}; pooled {format_interval(pooled, fmt, signed=True)} treating "
            f"instances as random (K={pooled.n_strata}{test}{left}): {_direction(pooled, a, b)}")
