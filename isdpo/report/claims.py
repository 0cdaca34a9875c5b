"""The report's claims: which methods are compared (importance-sampled against its base, online against offline)
and the paired differences a - b per task instance and pooled over instances, each with its t-interval, p-value,
Holm-adjusted p-value over every claim of the report, and the sentence it supports (docs/method.md §7)."""
from __future__ import annotations

import math
from typing import NamedTuple

from isdpo.report.plots import loss_order
from isdpo.report.quantities import CLAIM_QUANTITIES, TABLE_QUANTITIES, run_values
from isdpo.report.runs import INSTANCE_KEY, UNUSED, Run, by_instance, format_value, loss_traits, short_names
from isdpo.report.stats import LEVEL, Interval, claim, format_p, holm, instances_interval, paired_differences, \
    pooled_claim, sign_test, t_interval
from isdpo.report.tables import interval_fields, md_escape


class Arm(NamedTuple):
    """A method of the sweep: the loss name and what its config says it is (``runs.loss_traits``): two runs of
    one loss name with importance sampling or online training set differently are two arms."""

    name: str
    weighted: bool
    online: bool
    base: str


def arm(run: Run) -> Arm:
    return Arm(str(run.loss), *loss_traits(run))


def comparisons(runs: list[Run]) -> list[tuple[Arm, Arm]]:
    """(a, b) arms compared as a - b: each importance-sampled arm against its base (same loss.base, importance
    sampling off, offline; preferring the name without the "is" prefix), and each online arm against the offline
    arm and the importance-sampled arm of its base."""
    arms = list(dict.fromkeys(arm(r) for r in runs if r.ok and r.loss))
    order = loss_order([a.name for a in arms])
    arms.sort(key=lambda x: (order.index(x.name), x.online, x.weighted))
    plain = [a for a in arms if not a.weighted and not a.online]
    weighted = [a for a in arms if a.weighted and not a.online]

    def pick(candidates: list[Arm], preferred: str) -> Arm | None:
        named = [a for a in candidates if a.name == preferred]
        if len(named) == 1:
            return named[0]
        return candidates[0] if len(candidates) == 1 else None

    out = []
    for a in weighted:
        other = pick([b for b in plain if b.base == a.base], a.name.removeprefix("is"))
        out += [(a, other)] if other else []
    for a in [x for x in arms if x.online and not x.weighted]:
        stem = a.name.removeprefix("online_")
        out += [(a, other) for other in (pick([b for b in plain if b.base == a.base], stem),
                                         pick([b for b in weighted if b.base == a.base], "is" + stem)) if other]
    return out


def _is_loss_identity(key: str) -> bool:
    """Settings that make two losses different methods, so pairs need not agree on them."""
    return key in ("loss.name", "loss.base", "loss.online") or key.startswith("loss.importance_sampling.")


def claim_rows(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[dict]:
    """Paired differences a - b (``comparisons``) of every ``CLAIM_QUANTITIES`` metric that the runs have, per
    instance and (with more than one instance) pooled, with the claim each interval supports; ``p_holm`` and
    ``survives_holm``: Holm's correction over all the rows (the report's family of claims).

    Runs are paired by task, beta, instance, seed and every other varying setting except the loss's identity
    (name, base, online, importance sampling); the loss's own parameters must agree. A run without a partner is
    left out and counted (``n_unpaired``, ``unpaired``).
    """
    done = [r for r in runs if r.ok]
    names = short_names(list(done[0].variant) + [instance_key]) if done else {}
    values = {id(r): run_values(r) for r in done}
    rows = []
    for task in sorted({r.task or "" for r in done}):
        task_runs = [r for r in done if (r.task or "") == task]
        for a_arm, b_arm in comparisons(task_runs):
            def sides(side: Arm) -> dict[tuple, list[Run]]:
                out: dict[tuple, list[Run]] = {}
                for run in task_runs:
                    if arm(run) == side:
                        context = tuple((k, v) for k, v in run.settings.items()
                                        if k != instance_key and not _is_loss_identity(k))
                        label = ", ".join([side.name] + [f"{names[k]}={format_value(v)}"
                                                         for k, v in run.variant.items()
                                                         if k.startswith("loss.") and k != instance_key
                                                         and v is not UNUSED])
                        out.setdefault((label, run.beta, context), []).append(run)
                return out

            a_sides, b_sides = sides(a_arm), sides(b_arm)
            for (a_label, beta, context), a_runs in sorted(a_sides.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                matches = [(b_label, b_runs) for (b_label, b_beta, b_context), b_runs in b_sides.items()
                           if b_beta == beta and b_context == context] or [(b_arm.name, [])]
                shown = [f"{names[k]}={format_value(v)}" for k, v in a_runs[0].variant.items()
                         if not k.startswith("loss.") and k != instance_key]
                where = ", ".join([f"beta={beta:g}"] + shown)
                for b_label, b_runs in matches:
                    rows += _pair_claims(task, a_label, b_label, beta, where, a_runs, b_runs, values)
    adjusted, survives = holm([r["p"] for r in rows])
    for row, p_holm, ok in zip(rows, adjusted, survives):
        row["p_holm"], row["survives_holm"] = float(p_holm), bool(ok)
    # The sign tests are a family of their own (one per pooled row): a second test of the same rows, not a claim
    # the first family could pick up after the fact.
    adjusted, survives = holm([r["p_sign"] for r in rows])
    for row, p_holm, ok in zip(rows, adjusted, survives):
        row["p_sign_holm"], row["sign_survives_holm"] = float(p_holm), bool(ok)
    return rows


def _claim_fields(interval: Interval) -> dict:
    """An interval's claims.csv columns; ``p_holm`` and ``survives_holm`` are set once the family is complete."""
    return {**interval_fields(interval), "p": interval.p, "p_holm": math.nan, "survives_holm": False,
            "verdict": interval.verdict, "p_sign": math.nan, "p_sign_holm": math.nan, "sign_survives_holm": False}


def _pair_claims(task: str, a: str, b: str, beta: float, where: str, a_runs: list[Run], b_runs: list[Run],
                 values: dict[int, dict]) -> list[dict]:
    """The claim rows of one comparison in one context (beta and settings), per instance and pooled; a metric
    no run of either side has (the golden reward of a task without one) makes no row."""
    a_inst, b_inst = by_instance(a_runs), by_instance(b_runs)
    instances = list(by_instance(a_runs + b_runs))
    rows = []
    for col in CLAIM_QUANTITIES:
        if all(values[id(r)][col] is None for r in a_runs + b_runs):
            continue
        metric, fmt = TABLE_QUANTITIES[col]
        strata, per_instance, unpaired_all = [], [], []
        base = {"task": task, "comparison": f"{a} - {b}", "a": a, "b": b, "beta": beta, "context": where,
                "metric": col}
        none = dict.fromkeys(("n_higher", "n_lower", "n_above_zero", "n_below_zero"))
        for instance in instances:
            diffs, only_a, only_b = paired_differences(
                {r.seed: values[id(r)][col] for r in a_inst.get(instance, [])},
                {r.seed: values[id(r)][col] for r in b_inst.get(instance, [])})
            unpaired = [f"{a} seed {s}" for s in only_a] + [f"{b} seed {s}" for s in only_b]
            unpaired_all += [f"{u} ({instance})" if instance else u for u in unpaired]
            strata.append(list(diffs.values()))
            interval = t_interval(strata[-1])
            per_instance.append(interval)
            context = ", ".join(p for p in (where, instance) if p)
            rows.append({**base, "level": "instance", "instance": instance, "n_instances": 1, "n_pairs": interval.n,
                         "n_unpaired": len(unpaired), "unpaired": "; ".join(unpaired), **_claim_fields(interval),
                         **none, "claim": claim(context, a, b, metric, interval, fmt=fmt, unpaired=len(unpaired))})
        if len(instances) > 1:
            interval = instances_interval(strata)
            means = [iv for iv in per_instance if not math.isnan(iv.mean)]
            counts = {"n_higher": sum(iv.mean > 0 for iv in means), "n_lower": sum(iv.mean < 0 for iv in means),
                      "n_above_zero": sum(iv.defined and iv.low > 0 for iv in means),
                      "n_below_zero": sum(iv.defined and iv.high < 0 for iv in means)}
            rows.append({**base, "level": "pooled", "instance": f"pooled over {len(instances)}",
                         "n_instances": interval.n_strata, "n_pairs": interval.n, "n_unpaired": len(unpaired_all),
                         "unpaired": "; ".join(unpaired_all), **_claim_fields(interval), **counts,
                         "p_sign": sign_test(counts["n_higher"], counts["n_lower"]),
                         "claim": pooled_claim(where, a, b, metric, interval, per_instance, fmt=fmt,
                                               unpaired=len(unpaired_all))})
    return rows


def holm_mark(row: dict) -> str:
    """"✓ survives Holm (p_holm = 0.004)", "✗ not after Holm (p_holm = 0.31)" or "" (no test)."""
    if math.isnan(row["p_holm"]):
        return ""
    adjusted = format_p(row["p_holm"]).replace("p ", "p_holm ", 1)
    return f"✓ survives Holm ({adjusted})" if row["survives_holm"] else f"✗ not after Holm ({adjusted})"


def sign_mark(row: dict) -> str:
    """"; sign test over instances p = 0.002, ✗ not after Holm over the sign tests (p_holm = 0.06)" or "" (none)."""
    if math.isnan(row["p_sign"]):
        return ""
    adjusted = format_p(row["p_sign_holm"]).replace("p ", "p_holm ", 1)
    verdict = "✓ survives" if row["sign_survives_holm"] else "✗ not after"
    return f"; sign test over instances {format_p(row['p_sign'])}, {verdict} Holm over the sign tests ({adjusted})"


def claims_markdown(rows: list[dict]) -> list[str]:
    """The Claims section's lines for one task: per comparison, the pooled claims (when there are several
    instances) as a list and the per-instance ones (folded when pooled ones are shown), each marked with whether it
    survives Holm's correction."""
    def line(r: dict) -> str:
        mark = holm_mark(r)
        return (f"- {md_escape(r['claim'])}" + (f" — **{mark}**" if r["survives_holm"] else f" — {mark}" if mark
                                                   else "") + sign_mark(r))

    lines: list[str] = []
    for comparison in dict.fromkeys(r["comparison"] for r in rows):
        mine = [r for r in rows if r["comparison"] == comparison]
        pooled = [r for r in mine if r["level"] == "pooled"]
        per_instance = [r for r in mine if r["level"] == "instance"]
        lines += [f"#### `{comparison}`", ""]
        lines += [line(r) for r in pooled] + ([""] if pooled else [])
        if pooled:
            lines += ["<details><summary>Per instance</summary>", ""]
        lines += [line(r) for r in per_instance] + [""]
        if pooled:
            lines += ["</details>", ""]
    return lines


def claims_note(rows: list[dict]) -> str:
    """How many claims the family holds and how many survive Holm's correction, for the section's caption."""
    tested = [r for r in rows if not math.isnan(r["p"])]
    signs = [r for r in rows if not math.isnan(r["p_sign"])]
    note = (f"Holm's correction over the family of all {len(tested)} claims with a test in this report (per instance "
            f"and pooled, every metric and comparison): {sum(r['survives_holm'] for r in tested)} survive at "
            f"{1 - LEVEL:g} (✓).")
    if signs:
        note += (f" Each pooled claim also gives the exact sign test over its instances (on how many a is higher; "
                 f"nothing assumed of the sizes), corrected by Holm over the {len(signs)} sign tests: "
                 f"{sum(r['sign_survives_holm'] for r in signs)} survive.")
    return note
