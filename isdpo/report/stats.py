"""Statistics of a sweep report: bootstrap intervals over seeds, pooled over task instances, paired differences
and the claim each interval supports. Pure functions of numbers (numpy and the standard library), seeded.

Formulas (level ``LEVEL`` = 0.95, alpha = 1 - level):

- Percentile bootstrap of a mean over n values x_1..x_n: the distribution of the mean of n values drawn with
  replacement from {x_i}; the interval is its alpha/2 and 1 - alpha/2 quantiles (inverse CDF: the smallest
  resample mean m with P(mean <= m) >= q). When n^n <= ``N_RESAMPLES`` (n <= 5) every one of the n^n equally
  likely resamples is enumerated, so the interval is exact; otherwise ``N_RESAMPLES`` resamples are drawn with
  ``numpy.random.default_rng(SEED)``.
- Stratified bootstrap (pooled over instances): the estimate is the mean of the stratum means,
  (1/K) sum_k mean(x_k); a resample draws n_k values with replacement within each stratum k (strata fixed).
  Exact enumeration when prod_k n_k^n_k <= ``N_RESAMPLES``.
- No interval (NaN bounds, "n/a") when some stratum has fewer than 2 values: one seed says nothing about
  seed-to-seed variation, and a zero-width interval would pretend it does.
- Paired difference: d_j = a_j - b_j over the keys (instance, seed, ...) both sides have; its mean and the
  (stratified) bootstrap interval of the mean of d. Keys on one side only are unpaired: left out and counted.
- Bins (over-optimization curve): points sorted by x and split into equal-count bins (quantile bins); each bin
  gives the mean x, mean y and the bootstrap interval of mean y (its points treated as independent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0
QUANTILE_METHOD = "inverted_cdf"  # the quantile of the resampling distribution itself, no interpolation


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval; ``low``/``high`` are NaN when there is none (n/a)."""

    mean: float
    low: float
    high: float
    n: int  # values used (finite ones), all strata together
    n_strata: int = 1
    resamples: int = 0  # resamples behind the interval (enumerated or drawn); 0 = no interval
    exact: bool = False  # True: every resample enumerated

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


def _exact_means(x: np.ndarray) -> np.ndarray:
    """Means of all n^n resamples (index tuples) of ``x``, each equally likely."""
    n = len(x)
    sums = np.zeros(1)
    for _ in range(n):
        sums = (sums[:, None] + x[None, :]).ravel()
    return sums / n


def _resample_distribution(strata: list[np.ndarray], n_resamples: int, seed: int) -> tuple[np.ndarray, bool]:
    """The bootstrap distribution of the mean of stratum means: (values, exact)."""
    sizes = [len(x) for x in strata]
    if math.prod(n ** n for n in sizes) <= n_resamples:
        dist = np.zeros(1)
        for x in strata:
            dist = (dist[:, None] + _exact_means(x)[None, :]).ravel()
        return dist / len(strata), True
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for x in strata:
        total += x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    return total / len(strata), False


def stratified_interval(strata: Sequence[Sequence[float]], *, level: float = LEVEL,
                        n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of the stratum means and its stratified percentile bootstrap interval (module docstring).

    Non-finite values are dropped; an empty stratum is left out (it has no mean).
    """
    kept = [x for x in (finite(s) for s in strata) if len(x)]
    if not kept:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    estimate = float(np.mean([x.mean() for x in kept]))
    n = sum(len(x) for x in kept)
    if min(len(x) for x in kept) < 2:
        return Interval(estimate, math.nan, math.nan, n, len(kept))
    dist, exact = _resample_distribution(kept, n_resamples, seed)
    alpha = 1.0 - level
    low, high = np.quantile(dist, [alpha / 2, 1 - alpha / 2], method=QUANTILE_METHOD)
    # Enumerated or drawn, a resample mean is a sum in another order than the estimate's: allow for rounding,
    # so that n identical values give the interval [x, x] and not one a few ulps off.
    tol = 1e-9 * max(1.0, abs(estimate))
    low = estimate if estimate < low <= estimate + tol else float(low)
    high = estimate if estimate - tol <= high < estimate else float(high)
    return Interval(estimate, low, high, n, len(kept), len(dist), exact)


def bootstrap_interval(values: Sequence[float], *, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                       seed: int = SEED) -> Interval:
    """Mean of ``values`` and its percentile bootstrap interval (one stratum)."""
    return stratified_interval([values], level=level, n_resamples=n_resamples, seed=seed)


def interval_note(n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> str:
    """How the intervals were computed, for a table's caption."""
    exact_up_to = max(n for n in range(1, 12) if n ** n <= n_resamples)
    return (f"{level:.0%} percentile bootstrap over seeds: exact (all n^n resamples enumerated) for n ≤ "
            f"{exact_up_to} seeds, else {n_resamples:,} resamples (numpy seed {seed}); n/a with one seed")


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


def binned_curve(x: Sequence[float], y: Sequence[float], n_bins: int, *, level: float = LEVEL,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """(bin mean x, bin mean y, band low, band high) over ``n_bins`` equal-count bins of the points sorted by x.

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
    intervals = [bootstrap_interval(ya[c], level=level, n_resamples=n_resamples, seed=seed) for c in chunks]
    return (bx, np.array([i.mean for i in intervals]), np.array([i.low for i in intervals]),
            np.array([i.high for i in intervals]))


def default_bins(n_points: int, most: int = 10, per_bin: int = 4) -> int:
    """Number of quantile bins for ``n_points`` points: ``most`` (10) once there are enough for ``per_bin`` each."""
    return max(1, min(most, n_points // per_bin))


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


def claim(context: str, a: str, b: str, metric: str, interval: Interval, *, fmt: str = ".3f",
          unit: str = "seeds", unpaired: int = 0) -> str:
    """One sentence: the mean paired difference a - b of ``metric``, its interval and what it shows.

    e.g. "beta=0.01, chain_seed=1: isdpo - dpo final win rate +0.112 [+0.071, +0.150] (5 seeds): the interval
    excludes zero: isdpo higher".
    """
    head = f"{context}: {a} - {b} {metric} {format_interval(interval, fmt, signed=True)} ({interval.n} {unit}"
    head += f"; {unpaired} unpaired run{'s' if unpaired != 1 else ''} left out)" if unpaired else ")"
    if interval.verdict == "n/a":
        why = "no pair" if interval.n == 0 else f"fewer than 2 {unit}"
        return f"{head}: no interval ({why}): nothing shown"
    if interval.verdict == "includes zero":
        return f"{head}: the interval includes zero: no difference shown"
    return f"{head}: the interval excludes zero: {a if interval.mean > 0 else b} higher"
