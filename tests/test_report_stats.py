"""isdpo.report_stats (bootstrap intervals, pairing, claims) and the report's Statistics / Claims / figure files,
on hand-written fake run folders with known numbers."""
import csv
import itertools
import json
import math

import numpy as np
import pytest

from isdpo.report import __main__ as report_cli
from isdpo.report import build as report_build
from isdpo.report import claims as report_claims
from isdpo.report import runs as report_runs
from isdpo.report import stats as report_stats
from isdpo.report import tables as report_tables
from isdpo.report.stats import bootstrap_interval, stratified_interval
from tests.hydra_utils import CONF
from tests.test_report import write_real_run

STEPS = (0, 10, 20, 30)
TRAITS = {  # loss -> (base, importance sampling on, online)
    "dpo": ("dpo", False, False), "isdpo": ("dpo", True, False), "online_dpo": ("dpo", False, True),
    "ipo": ("ipo", False, False), "isipo": ("ipo", True, False), "rpo": ("rpo", False, False),
}


def inverse_cdf(values, q):
    """The smallest v with P(X <= v) >= q over equally likely ``values`` (what the module documents)."""
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered) - 1e-12) - 1]


def write_fake(root, loss, beta, seed, chain_seed, final, *, kl=1.0, status="completed", is_metrics=True,
               name=None):
    """A run folder: .hydra/config.yaml (loss traits, task.chain_seed), metrics.jsonl whose last win rate is
    ``final`` and peak ``final + 0.05``, result.json with final and peak."""
    base, weighted, online = TRAITS[loss]
    folder = root / (name or f"beta={beta},loss={loss},seed={seed},task.chain_seed={chain_seed}")
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"task:\n  name: synthetic\n  chain_seed: {chain_seed}\nloss:\n  name: {loss}\n  base: {base}\n"
        f"  online: {str(online).lower()}\n  importance_sampling:\n    enabled: {str(weighted).lower()}\n"
        f"beta: {beta}\nseed: {seed}\n")
    rows = []
    for i, step in enumerate(STEPS):
        win = final + 0.05 if i == len(STEPS) - 2 else final - 0.1 * (len(STEPS) - 1 - i)
        row = {"step": step, "win_rate": win, "kl": kl * i / (len(STEPS) - 1), "loss": 0.7 - 0.01 * i,
               "rewards/accuracies": 0.5 + 0.05 * i}
        if is_metrics:
            row.update({"is/ess_frac": 1.0 - 0.1 * i, "is/frac_clipped": 0.02 * i, "is/weight_max": 1.0 + i,
                        "is/weight_raw_max": 1.0 + 2 * i})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"status": status, "task": "synthetic", "loss": loss, "beta": beta, "seed": seed, "final": rows[-1],
              "peak": max(rows, key=lambda r: r["win_rate"])}
    (folder / "result.json").write_text(json.dumps(result))
    return folder


# ----------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ----------------------------------------------------------------------------------------------------------

def test_bootstrap_equals_the_enumerated_distribution():
    values = [0.0, 1.0, 3.0]
    means = [sum(t) / 3 for t in itertools.product(values, repeat=3)]  # all 27 resamples, equally likely
    interval = bootstrap_interval(values)
    assert interval.exact and interval.resamples == 27
    assert interval.mean == pytest.approx(4 / 3)
    assert interval.low == pytest.approx(inverse_cdf(means, 0.025)) == pytest.approx(0.0)
    assert interval.high == pytest.approx(inverse_cdf(means, 0.975)) == pytest.approx(3.0)
    two = bootstrap_interval([0.2, 0.6])  # resample means 0.2, 0.4, 0.4, 0.6
    assert (two.low, two.high) == pytest.approx((0.2, 0.6))
    # Drawn resamples (forced by a budget below 3^3) approach the enumerated interval's bounds.
    drawn = bootstrap_interval([0.0, 1.0, 3.0, 3.0, 0.0, 1.0], n_resamples=20_000)
    enumerated = bootstrap_interval([0.0, 1.0, 3.0, 3.0, 0.0, 1.0], n_resamples=6 ** 6)
    assert not drawn.exact and enumerated.exact
    assert drawn.low == pytest.approx(enumerated.low, abs=0.17) and drawn.high == pytest.approx(enumerated.high,
                                                                                                  abs=0.17)


def test_bootstrap_contains_the_mean_shrinks_with_n_and_is_deterministic():
    rng = np.random.default_rng(1)
    widths = []
    for n in (5, 20, 200):
        values = rng.normal(0.6, 0.1, size=n)
        interval = bootstrap_interval(values)
        assert interval.low < interval.mean < interval.high and interval.mean == pytest.approx(values.mean())
        assert bootstrap_interval(values) == interval  # same numbers, same interval
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(200), rel=0.25)  # ~ normal theory


def test_one_value_nan_and_nothing_give_no_interval():
    one = bootstrap_interval([0.7, float("nan"), None])
    assert one.mean == 0.7 and one.n == 1 and not one.defined and one.verdict == "n/a"
    assert report_stats.format_interval(one) == "0.700 [n/a]"
    empty = bootstrap_interval([])
    assert math.isnan(empty.mean) and empty.n == 0
    assert "no interval" in report_stats.claim("beta=0.1", "isdpo", "dpo", "final win rate", one)


def test_stratified_interval_on_two_instances_equals_enumeration():
    a, b = [0.0, 1.0], [2.0, 4.0]
    pooled = [(sum(x) / 2 + sum(y) / 2) / 2 for x in itertools.product(a, repeat=2)
              for y in itertools.product(b, repeat=2)]  # 16 equally likely resamples, instances fixed
    interval = stratified_interval([a, b])
    assert interval.exact and interval.resamples == 16 and interval.n == 4 and interval.n_strata == 2
    assert interval.mean == pytest.approx((0.5 + 3.0) / 2)  # mean of the instance means
    assert (interval.low, interval.high) == pytest.approx((inverse_cdf(pooled, 0.025), inverse_cdf(pooled, 0.975)))
    assert (interval.low, interval.high) == pytest.approx((1.0, 2.5))
    # Unequal instances: the mean of instance means, not of all values.
    assert stratified_interval([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0]]).mean == pytest.approx(0.5)
    # An instance with one seed: no interval (it says nothing about seed-to-seed variation).
    assert not stratified_interval([[0.0, 1.0], [2.0]]).defined


def test_paired_differences_counts_unpaired_and_nan():
    diffs, only_a, only_b = report_stats.paired_differences({0: 0.6, 1: 0.7, 2: 0.8, 3: float("nan")},
                                                 {0: 0.5, 1: 0.5, 4: 0.1, 3: 0.2})
    assert diffs == pytest.approx({0: 0.1, 1: 0.2}) and only_a == [2] and only_b == [4, 3]


# ----------------------------------------------------------------------------------------------------------
# Report: statistics, pairing, claims
# ----------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3)
DPO_FINAL = {(c, s): 0.55 + 0.03 * s - 0.02 * c for c in (0, 1) for s in SEEDS}
NOISE = (0.05, -0.05, 0.03, -0.03)  # symmetric: mean zero


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """dpo, isdpo (= dpo + 0.1 exactly), ipo, isipo (= ipo + symmetric noise), online_dpo (= dpo - 0.2 on
    chain_seed 0, missing seed 3), at beta 0.1, chain_seed 0 and 1, seeds 0-3; plus one failed isdpo run."""
    root = tmp_path_factory.mktemp("stats") / "sweep"
    for c in (0, 1):
        for s in SEEDS:
            final = DPO_FINAL[(c, s)]
            write_fake(root, "dpo", 0.1, s, c, final, kl=1.0 + s)
            write_fake(root, "isdpo", 0.1, s, c, final + 0.1, kl=0.5 + s)
            write_fake(root, "ipo", 0.1, s, c, final)
            write_fake(root, "isipo", 0.1, s, c, final + NOISE[s])
            if s != 3:
                write_fake(root, "online_dpo", 0.1, s, c, final - 0.2)
    write_fake(root, "isdpo", 0.1, 9, 0, 0.99, status="failed")
    return root


def claim_of(rows, comparison, metric, instance):
    (row,) = [r for r in rows if r["comparison"] == comparison and r["metric"] == metric
              and r["instance"] == instance]
    return row


def test_paired_difference_exact_shift_excludes_zero(grid):
    runs = report_runs.load_sweep(grid)
    rows = report_claims.claim_rows(runs)
    assert {r["comparison"] for r in rows} == {"isdpo - dpo", "isipo - ipo", "online_dpo - dpo",
                                               "online_dpo - isdpo"}
    for instance in ("chain_seed=0", "chain_seed=1", "pooled over 2"):
        row = claim_of(rows, "isdpo - dpo", "final_win_rate", instance)
        assert row["mean"] == pytest.approx(0.1) and row["ci_low"] == pytest.approx(0.1)
        assert row["ci_high"] == pytest.approx(0.1) and row["verdict"] == "excludes zero"
        assert row["n_pairs"] == (8 if instance.startswith("pooled") else 4) and row["n_unpaired"] == 0
    text = claim_of(rows, "isdpo - dpo", "final_win_rate", "chain_seed=1")["claim"]
    assert text == ("beta=0.1, chain_seed=1: isdpo - dpo final win rate +0.100 [+0.100, +0.100] (4 seeds): "
                    "the interval excludes zero: isdpo higher")
    kl = claim_of(rows, "isdpo - dpo", "max_kl", "pooled over 2")
    assert kl["mean"] == pytest.approx(-0.5) and kl["claim"].endswith("dpo higher")
    # The failed isdpo run (seed 9) is neither paired nor counted as unpaired: it is not a result.
    assert all(r["n_unpaired"] == 0 for r in rows if r["comparison"] == "isdpo - dpo")


def test_paired_difference_symmetric_noise_includes_zero(grid):
    rows = report_claims.claim_rows(report_runs.load_sweep(grid))
    for instance in ("chain_seed=0", "pooled over 2"):
        row = claim_of(rows, "isipo - ipo", "final_win_rate", instance)
        assert row["mean"] == pytest.approx(0.0, abs=1e-12)
        assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "includes zero"
        assert row["claim"].endswith("the interval includes zero: no difference shown")


def test_unpaired_runs_are_left_out_and_counted(grid):
    rows = report_claims.claim_rows(report_runs.load_sweep(grid))
    row = claim_of(rows, "online_dpo - dpo", "final_win_rate", "chain_seed=0")
    assert row["n_pairs"] == 3 and row["n_unpaired"] == 1 and row["unpaired"] == "dpo seed 3"
    assert row["mean"] == pytest.approx(-0.2) and "(3 seeds; 1 unpaired run left out)" in row["claim"]
    pooled = claim_of(rows, "online_dpo - isdpo", "final_win_rate", "pooled over 2")
    assert pooled["n_pairs"] == 6 and pooled["n_unpaired"] == 2 and pooled["mean"] == pytest.approx(-0.3)
    assert "pooled over chain_seed=0, chain_seed=1 (instances fixed)" in pooled["claim"]


def test_statistics_rows_per_instance_and_pooled(grid):
    rows = report_tables.statistics_rows(report_runs.load_sweep(grid))
    dpo = {r["instance"]: r for r in rows if r["loss"] == "dpo" and r["metric"] == "final_win_rate"}
    assert set(dpo) == {"chain_seed=0", "chain_seed=1", "pooled over 2"}
    for c in (0, 1):
        values = [DPO_FINAL[(c, s)] for s in SEEDS]
        row = dpo[f"chain_seed={c}"]
        expected = bootstrap_interval(values)
        assert (row["n"], row["seeds"], row["mean"]) == (4, "0 1 2 3", pytest.approx(np.mean(values)))
        assert (row["ci_low"], row["ci_high"]) == (expected.low, expected.high)
    pooled = dpo["pooled over 2"]
    strata = [[DPO_FINAL[(c, s)] for s in SEEDS] for c in (0, 1)]
    assert (pooled["n_instances"], pooled["n"]) == (2, 8)
    assert pooled["mean"] == pytest.approx(np.mean([np.mean(s) for s in strata]))
    assert (pooled["ci_low"], pooled["ci_high"]) == (stratified_interval(strata).low,
                                                     stratified_interval(strata).high)
    drop = next(r for r in rows if r["loss"] == "dpo" and r["metric"] == "drop" and r["instance"] == "chain_seed=0")
    assert drop["mean"] == pytest.approx(0.05)  # peak - final, by construction
    max_kl = next(r for r in rows if r["loss"] == "dpo" and r["metric"] == "max_kl"
                  and r["instance"] == "chain_seed=0")
    assert max_kl["mean"] == pytest.approx(1.0 + np.mean(SEEDS))
    # The failed isdpo run is not averaged: isdpo has 4 seeds per instance.
    assert {r["n"] for r in rows if r["loss"] == "isdpo" and r["level"] == "instance"} == {4}


def test_report_files_claims_csv_and_figures(grid, tmp_path):
    out = tmp_path / "rep"
    md = report_build.build_report(grid, out, log=lambda msg: None).read_text()
    with open(out / "claims.csv") as f:
        claims = list(csv.DictReader(f))
    # 4 comparisons x 5 metrics x (2 instances + pooled)
    assert len(claims) == 4 * len(report_tables.STAT_QUANTITIES) * 3
    row = next(r for r in claims if r["comparison"] == "isdpo - dpo" and r["metric"] == "final_win_rate"
               and r["level"] == "pooled")
    assert float(row["mean"]) == pytest.approx(0.1) and row["verdict"] == "excludes zero"
    assert row["claim"] in md.split("## Claims")[1]
    with open(out / "stats.csv") as f:
        stats = list(csv.DictReader(f))
    assert {r["level"] for r in stats} == {"instance", "pooled"}
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert all(float(r["final_win_rate_ci_low"]) <= float(r["final_win_rate_mean"])
               <= float(r["final_win_rate_ci_high"]) for r in summary)
    assert "## Statistics" in md and "Pooled over instances:" in md and "95% CI" in md
    assert "`beta=0.1,loss=isdpo,seed=9,task.chain_seed=0`" in md.split("## Incomplete and failed runs")[1]
    stems = ["overopt", "win_rate_vs_step", "kl_vs_step", "eval_loss_vs_step", "eval_accuracy_vs_step",
             "win_rate_vs_beta", "is_diagnostics"]
    per_instance = ["overopt", "win_rate_vs_step", "kl_vs_step", "win_rate_vs_beta"]
    names = [f"{s}_synthetic" for s in stems] + [f"{s}_synthetic_per_instance" for s in per_instance]
    for name in names:
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
            assert f"`{name}.{ext}`" in md.split("## Files")[1]
        assert f"]({name}.png)" in md
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in names)
    assert len(list(out.iterdir())) == 2 * len(names) + 5  # + report.md and 4 CSVs


def test_one_seed_runs_missing_metrics_and_nan(tmp_path):
    """One seed per configuration: no interval (n/a), no crash; a NaN final win rate is left out."""
    write_fake(tmp_path, "dpo", 0.1, 0, 0, 0.6, is_metrics=False)
    write_fake(tmp_path, "isdpo", 0.1, 0, 0, 0.7, is_metrics=False)
    folder = write_fake(tmp_path, "isdpo", 0.1, 1, 0, 0.7, is_metrics=False)
    result = json.loads((folder / "result.json").read_text())
    result["final"]["win_rate"] = float("nan")
    (folder / "result.json").write_text(json.dumps(result))
    out = tmp_path / "rep"
    md = report_build.build_report(tmp_path, out, log=lambda msg: None).read_text()
    summary = {r["loss"]: r for r in report_tables.summarise(report_runs.load_sweep(tmp_path))}
    assert summary["isdpo"]["final_win_rate_n"] == 1 and summary["isdpo"]["final_win_rate_mean"] == 0.7
    assert math.isnan(summary["isdpo"]["final_win_rate_ci_low"])
    claim = next(r for r in report_claims.claim_rows(report_runs.load_sweep(tmp_path)) if r["metric"] == "final_win_rate")
    assert claim["n_pairs"] == 1 and claim["verdict"] == "n/a" and "no interval" in claim["claim"]
    assert "n/a" in md and not (out / "is_diagnostics_synthetic.png").exists()  # no run logs IS weights


def test_nan_final_is_left_out(tmp_path):
    """Regression: a NaN in result.json made summarise raise (statistics.stdev of NaN: AttributeError)."""
    for seed in (0, 1, 2):
        write_fake(tmp_path, "dpo", 0.1, seed, 0, 0.5 + 0.1 * seed)
    folder = tmp_path / "beta=0.1,loss=dpo,seed=2,task.chain_seed=0"
    result = json.loads((folder / "result.json").read_text())
    result["final"]["win_rate"] = float("nan")
    (folder / "result.json").write_text(json.dumps(result))
    row = report_tables.summarise(report_runs.load_sweep(tmp_path))[0]
    assert row["final_win_rate_n"] == 2 and row["final_win_rate_mean"] == pytest.approx(0.55)


def test_comparisons_from_the_loss_config_and_the_name_fallback(tmp_path):
    # Config first: an importance-sampled loss named freely is compared with the loss of its loss.base.
    TRAITS["weighted"] = ("ipo", True, False)
    try:
        for loss in ("dpo", "ipo", "weighted", "rpo", "online_dpo", "isdpo"):
            write_fake(tmp_path / "a", loss, 0.1, 0, 0, 0.6)
        assert report_claims.comparisons(report_runs.load_sweep(tmp_path / "a")) == [
            ("isdpo", "dpo"), ("weighted", "ipo"), ("online_dpo", "dpo"), ("online_dpo", "isdpo")]
    finally:
        del TRAITS["weighted"]
    # No config: the name ("is" prefix) decides.
    for loss in ("dpo", "isdpo"):
        folder = write_fake(tmp_path / "b", loss, 0.1, 0, 0, 0.6)
        (folder / ".hydra" / "config.yaml").unlink()
    assert report_claims.comparisons(report_runs.load_sweep(tmp_path / "b")) == [("isdpo", "dpo")]


def test_instance_key_flag(grid, tmp_path):
    """--instance-key names another config key; a key no run has makes one instance (no pooled rows)."""
    out = tmp_path / "rep"
    assert report_cli.main([str(grid), "--out", str(out), "--no-figures", "--instance-key", "task.absent"]) == 0
    with open(out / "stats.csv") as f:
        stats = list(csv.DictReader(f))
    dpo = [r for r in stats if r["loss"] == "dpo" and r["metric"] == "final_win_rate"]
    # chain_seed is then an ordinary setting: one row per chain_seed, each its own single instance.
    assert sorted((r["task.chain_seed"], r["level"], r["n"]) for r in dpo) == [
        ("0", "instance", "4"), ("0", "pooled", "4"), ("1", "instance", "4"), ("1", "pooled", "4")]
    with open(out / "claims.csv") as f:
        assert {r["level"] for r in csv.DictReader(f)} == {"instance"}


def test_comparisons_and_pairs_with_composed_configs(tmp_path):
    """Real configs (as Hydra writes them): the loss config decides the pairs, and runs pair across the settings
    the losses differ in (name, importance sampling, online) but not others."""
    online = (CONF / "loss" / "online_dpo.yaml").is_file()  # added together with the online training mode
    losses = ["dpo", "isdpo", "ipo", "isipo"] + (["online_dpo"] if online else [])
    for loss in losses:
        for seed in (0, 1):
            write_real_run(tmp_path, [f"loss={loss}", f"seed={seed}"], tag="")
    runs = report_runs.load_sweep(tmp_path)
    expected = [("isdpo", "dpo"), ("isipo", "ipo")] + ([("online_dpo", "dpo"), ("online_dpo", "isdpo")]
                                                       if online else [])
    assert report_claims.comparisons(runs) == expected
    rows = [r for r in report_claims.claim_rows(runs) if r["metric"] == "final_win_rate"]
    assert [(r["comparison"], r["n_pairs"], r["n_unpaired"]) for r in rows] == [
        (f"{a} - {b}", 2, 0) for a, b in expected]


def test_overoptimization_panels_share_an_x_range_that_holds_every_point(tmp_path):
    """Every panel of the win-rate-vs-sqrt(KL) figure shows every point: the shared x-range reaches the largest
    sqrt(KL) of any run, also when a later panel holds it (setting the range per panel froze it at the first
    panel's data)."""
    from isdpo.report.plots import plot_overoptimization, series_colours

    for c, kl in ((0, 1.0), (1, 9.0)):
        for s in (0, 1):
            write_fake(tmp_path, "dpo", 0.1, s, c, 0.7, kl=kl)
    runs = [r for r in report_runs.load_sweep(tmp_path) if r.ok]
    fig = plot_overoptimization(runs, series_colours(runs), "synthetic", per_instance=True)
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 2
    for ax in panels:
        low, high = ax.get_xlim()
        assert low == 0.0 and high >= 3.0  # sqrt(9)


def test_a_long_legend_does_not_squash_the_panels(tmp_path):
    """Eight methods under one beta panel: the legend goes below and the figure grows by its height, so the panel
    keeps most of a panel's height (before, the legend took it and the panel was a thin strip)."""
    from isdpo.report.plots import FIG_HEIGHT_IN, plot_overoptimization, series_colours

    for loss in TRAITS:
        write_fake(tmp_path, loss, 0.01, 0, 0, 0.7)
    runs = [r for r in report_runs.load_sweep(tmp_path) if r.ok]
    assert len({r.loss for r in runs}) >= 5
    fig = plot_overoptimization(runs, series_colours(runs), "synthetic")
    fig.canvas.draw()
    (ax,) = [a for a in fig.axes if a.get_xlabel()]
    assert ax.get_window_extent().height / fig.dpi >= 0.5 * FIG_HEIGHT_IN
