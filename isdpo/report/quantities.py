"""Per-run quantities of a sweep report: what one completed run contributes to the tables, statistics, claims and
the against-beta figure (final and peak win rate and golden reward, peak - final, KL, held-out pair metrics, the
judge's win rate), from its result.json and its curve (metrics.jsonl).

The peak and the drop are cross-fitted (``stats.cross_fit``) on the curve's two halves of the evaluation prompts
(``win_rate_a``/``_b``, ``golden_reward_a``/``_b``) when the run logged them, so that the noise that picks the peak
does not inflate it; a run of older code without them gets the same-sample peak (biased upwards; the report says
how many). docs/method.md §7.
"""
from __future__ import annotations

import math
from typing import Callable

from isdpo.report.runs import Run, to_float
from isdpo.report.stats import cross_fit

#: metrics.jsonl keys of a curve measured on the two halves of the evaluation prompts (even / odd index).
HALVES = {"win_rate": ("win_rate_a", "win_rate_b"), "golden_reward": ("golden_reward_a", "golden_reward_b")}


def point(result: dict, which: str, key: str) -> float | None:
    """``result[which][key]`` (which: final | peak) as a float; None when the run has no such metric."""
    row = result.get(which)
    return to_float(row.get(key)) if isinstance(row, dict) else None


def _finite(value) -> float | None:
    number = to_float(value)
    return number if number is not None and math.isfinite(number) else None


def halves(run: Run, key: str) -> tuple[list[float], list[float]] | None:
    """(A, B): the curve of ``key`` on each half of the evaluation prompts, over the evaluation points where ``key``
    is finite; None when some such point lacks a finite half (a run of code older than the halves) or none has
    ``key``."""
    a_key, b_key = HALVES[key]
    rows = [row for row in run.metrics if _finite(row.get(key)) is not None]
    if not rows or any(_finite(row.get(a_key)) is None or _finite(row.get(b_key)) is None for row in rows):
        return None
    return [float(row[a_key]) for row in rows], [float(row[b_key]) for row in rows]


def cross_fitted(run: Run) -> bool:
    """Whether the run's win-rate peak and drop are cross-fitted (it logged both halves at every point)."""
    return halves(run, "win_rate") is not None


def _peak_and_drop(run: Run, key: str) -> tuple[float | None, float | None]:
    """(peak, peak - final) of curve ``key``: cross-fitted on the halves, else the same-sample maximum and the
    last point."""
    split = halves(run, key)
    if split is not None:
        return cross_fit(*split)
    values = [v for v in (_finite(row.get(key)) for row in run.metrics) if v is not None]
    if not values:
        return None, None
    return max(values), max(values) - values[-1]


def _peak_win_rate(run: Run) -> float | None:
    if cross_fitted(run):
        return _peak_and_drop(run, "win_rate")[0]
    return point(run.result or {}, "peak", "win_rate")


def _drop(run: Run) -> float | None:
    if cross_fitted(run):
        return _peak_and_drop(run, "win_rate")[1]
    peak, final = point(run.result or {}, "peak", "win_rate"), point(run.result or {}, "final", "win_rate")
    return None if peak is None or final is None else peak - final


def _max_kl(run: Run) -> float | None:
    """Largest finite KL over the run's evaluation points (metrics.jsonl); None without one."""
    kls = [v for v in (_finite(row.get("kl")) for row in run.metrics) if v is not None]
    return max(kls) if kls else None


def _judge(run: Run) -> float | None:
    judge = (run.result or {}).get("judge")
    return to_float(judge.get("win_rate")) if isinstance(judge, dict) else None


def _final(key: str) -> Callable[[Run], float | None]:
    return lambda run: point(run.result or {}, "final", key)


#: Per-run quantities in table order: column -> (header, number format, value of a completed Run or None). A table
#: shows a column only when some run has its value (no win rate without a golden reward).
QUANTITIES: dict[str, tuple[str, str, Callable[[Run], float | None]]] = {
    "final_win_rate": ("final win rate", ".3f", _final("win_rate")),
    "peak_win_rate": ("peak win rate", ".3f", _peak_win_rate),
    "peak_step": ("step of peak", ".0f", lambda run: point(run.result or {}, "peak", "step")),
    "final_kl": ("final KL", ".3g", _final("kl")),
    "max_kl": ("max KL over the curve", ".3g", _max_kl),
    "drop": ("peak − final win rate", ".3f", _drop),
    "final_golden_reward": ("final golden reward", ".3g", _final("golden_reward")),
    "peak_golden_reward": ("peak golden reward", ".3g", lambda run: _peak_and_drop(run, "golden_reward")[0]),
    "final_eval_accuracy": ("final held-out accuracy", ".3f", _final("rewards/accuracies")),
    "final_eval_loss": ("final held-out loss", ".3g", _final("loss")),
    "judge_win_rate": ("judge win rate", ".3f", _judge),
}
#: Column -> (header, number format) of ``QUANTITIES``.
TABLE_QUANTITIES: dict[str, tuple[str, str]] = {col: (header, fmt) for col, (header, fmt, _) in QUANTITIES.items()}
#: The quantities with 95% intervals (summary, statistics).
STAT_QUANTITIES = ("final_win_rate", "peak_win_rate", "drop", "final_golden_reward", "peak_golden_reward",
                   "final_kl", "max_kl")
#: The quantities compared in the claims (one family for Holm's correction: every claim row).
CLAIM_QUANTITIES = ("final_win_rate", "peak_win_rate", "drop", "final_golden_reward", "final_kl", "max_kl")


def run_values(run: Run) -> dict[str, float | None]:
    """Every ``QUANTITIES`` value of one completed run; None where the run has none or it is not finite (NaN):
    such a value is left out of means and intervals, not averaged."""
    values: dict[str, float | None] = {}
    for col, (_, _, get) in QUANTITIES.items():
        try:
            values[col] = _finite(get(run))
        except (KeyError, TypeError, ValueError, AttributeError):
            values[col] = None
    return values
