"""The report's claims: which losses are compared (importance-sampled against its base, online against offline)
and the paired differences a - b per task instance and pooled, each with the sentence its interval supports."""
from __future__ import annotations

from isdpo.report.plots import loss_order
from isdpo.report.runs import INSTANCE_KEY, Run, by_instance, format_value, resolve, short_names
from isdpo.report.stats import bootstrap_interval, claim, paired_differences, stratified_interval
from isdpo.report.tables import STAT_QUANTITIES, TABLE_QUANTITIES, interval_fields, md_escape, run_values

def loss_traits(run: Run) -> tuple[bool, bool, str]:
    """(importance sampling on, online, base loss) of a run's loss, from its config (loss.importance_sampling.enabled,
    loss.online, loss.base); without them, from the name ("is" prefix: importance-sampled, "online_" prefix: online,
    the rest: the base)."""
    name, cfg = str(run.loss), run.config or {}
    weighted = resolve(cfg, "loss.importance_sampling.enabled") if cfg else None
    online = resolve(cfg, "loss.online") if cfg else None
    base = resolve(cfg, "loss.base") if cfg else None
    weighted = weighted if isinstance(weighted, bool) else name.startswith("is")
    online = online if isinstance(online, bool) else name.startswith("online_")
    if not isinstance(base, str) or "${" in base:
        base = name.removeprefix("online_")
        base = base.removeprefix("is") if weighted else base
    return weighted, online, base


def comparisons(runs: list[Run]) -> list[tuple[str, str]]:
    """(a, b) loss-name pairs compared as a - b: each importance-sampled loss against its base (same loss.base,
    importance sampling off, offline; preferring the name without the "is" prefix, which is also the fallback),
    and each online loss against the offline loss and the importance-sampled loss of its base."""
    traits: dict[str, tuple[bool, bool, str]] = {}
    for run in runs:
        if run.ok and run.loss:
            traits.setdefault(run.loss, loss_traits(run))
    plain = [n for n, (w, o, _) in traits.items() if not w and not o]
    weighted = [n for n, (w, o, _) in traits.items() if w and not o]

    def pick(candidates: list[str], preferred: str) -> str | None:
        if preferred in candidates:
            return preferred
        return candidates[0] if len(candidates) == 1 else None

    out = []
    for name in loss_order(weighted):
        stem = name.removeprefix("is")
        other = pick([n for n in plain if traits[n][2] == traits[name][2]], stem)
        other = other or (stem if stem != name and stem in traits else None)
        out += [(name, other)] if other else []
    for name in loss_order([n for n, (w, o, _) in traits.items() if o and not w]):
        stem = name.removeprefix("online_")
        same_base = [n for n in plain if traits[n][2] == traits[name][2]]
        out += [(name, other) for other in (pick(same_base, stem),
                                            pick([n for n in weighted if traits[n][2] == traits[name][2]],
                                                 "is" + stem)) if other]
    return out


def _is_loss_identity(key: str) -> bool:
    """Settings that make two losses different methods, so pairs need not agree on them."""
    return key in ("loss.name", "loss.base", "loss.online") or key.startswith("loss.importance_sampling.")


def claim_rows(runs: list[Run], instance_key: str = INSTANCE_KEY) -> list[dict]:
    """Paired differences a - b (``comparisons``) of every ``STAT_QUANTITIES`` metric, per instance and (with
    more than one instance) pooled, with the claim each interval supports.

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
        for a_name, b_name in comparisons(task_runs):
            def sides(loss: str) -> dict[tuple, list[Run]]:
                out: dict[tuple, list[Run]] = {}
                for run in task_runs:
                    if run.loss == loss:
                        context = tuple((k, v) for k, v in run.settings.items()
                                        if k != instance_key and not _is_loss_identity(k))
                        label = ", ".join([loss] + [f"{names[k]}={format_value(v)}" for k, v in run.variant.items()
                                                    if k.startswith("loss.") and k != instance_key])
                        out.setdefault((label, run.beta, context), []).append(run)
                return out

            a_sides, b_sides = sides(a_name), sides(b_name)
            for (a_label, beta, context), a_runs in sorted(a_sides.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                matches = [(b_label, b_runs) for (b_label, b_beta, b_context), b_runs in b_sides.items()
                           if b_beta == beta and b_context == context] or [(b_name, [])]
                shown = [f"{names[k]}={format_value(v)}" for k, v in a_runs[0].variant.items()
                         if not k.startswith("loss.") and k != instance_key]
                where = ", ".join([f"beta={beta:g}"] + shown)
                for b_label, b_runs in matches:
                    rows += _pair_claims(task, a_label, b_label, beta, where, a_runs, b_runs, values)
    return rows


def _pair_claims(task: str, a: str, b: str, beta: float, where: str, a_runs: list[Run], b_runs: list[Run],
                 values: dict[int, dict]) -> list[dict]:
    """The claim rows of one comparison in one context (beta and settings), per instance and pooled."""
    a_inst, b_inst = by_instance(a_runs), by_instance(b_runs)
    instances = list(by_instance(a_runs + b_runs))
    rows = []
    for col in STAT_QUANTITIES:
        metric, fmt = TABLE_QUANTITIES[col][0], TABLE_QUANTITIES[col][1]
        strata, unpaired_all = [], []
        base = {"task": task, "comparison": f"{a} - {b}", "a": a, "b": b, "beta": beta, "context": where,
                "metric": col}
        for instance in instances:
            diffs, only_a, only_b = paired_differences({r.seed: values[id(r)][col] for r in a_inst.get(instance, [])},
                                            {r.seed: values[id(r)][col] for r in b_inst.get(instance, [])})
            unpaired = [f"{a} seed {s}" for s in only_a] + [f"{b} seed {s}" for s in only_b]
            unpaired_all += [f"{u} ({instance})" if instance else u for u in unpaired]
            strata.append(list(diffs.values()))
            interval = bootstrap_interval(strata[-1])
            context = ", ".join(p for p in (where, instance) if p)
            rows.append({**base, "level": "instance", "instance": instance, "n_pairs": interval.n,
                         "n_unpaired": len(unpaired), "unpaired": "; ".join(unpaired), **interval_fields(interval),
                         "verdict": interval.verdict,
                         "claim": claim(context, a, b, metric, interval, fmt=fmt, unpaired=len(unpaired))})
        if len(instances) > 1:
            interval = stratified_interval(strata)
            context = f"{where}, pooled over {', '.join(instances)} (instances fixed)"
            rows.append({**base, "level": "pooled", "instance": f"pooled over {len(instances)}",
                         "n_pairs": interval.n, "n_unpaired": len(unpaired_all), "unpaired": "; ".join(unpaired_all),
                         **interval_fields(interval), "verdict": interval.verdict,
                         "claim": claim(context, a, b, metric, interval, fmt=fmt, unit="pairs",
                                        unpaired=len(unpaired_all))})
    return rows


def claims_markdown(rows: list[dict]) -> list[str]:
    """The Claims section's lines for one task: per comparison, the pooled claims (when there are several
    instances) as a list and the per-instance ones (folded when pooled ones are shown)."""
    lines: list[str] = []
    for comparison in dict.fromkeys(r["comparison"] for r in rows):
        mine = [r for r in rows if r["comparison"] == comparison]
        pooled = [r for r in mine if r["level"] == "pooled"]
        per_instance = [r for r in mine if r["level"] == "instance"]
        lines += [f"#### `{comparison}`", ""]
        lines += [f"- {md_escape(r['claim'])}" for r in pooled] + ([""] if pooled else [])
        if pooled:
            lines += ["<details><summary>Per instance</summary>", ""]
        lines += [f"- {md_escape(r['claim'])}" for r in per_instance] + [""]
        if pooled:
            lines += ["</details>", ""]
    return lines


