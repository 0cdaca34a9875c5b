"""isdpo.report.stats (t-intervals, Holm, cross-fitting, pairing, claims) and the report's Statistics, Claims and
figure files, on hand-written fake run folders with known numbers."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from isdpo.report import __main__ as report_cli
from isdpo.report import build as report_build
from isdpo.report import claims as report_claims
from isdpo.report import runs as report_runs
from isdpo.report import stats as report_stats
from isdpo.report import tables as report_tables
from isdpo.report.quantities import CLAIM_QUANTITIES
from isdpo.report.stats import instances_interval, t_interval
from tests.hydra_utils import CONF
from tests.test_report import write_real_run

STEPS = (0, 10, 20, 30)
TRAITS = {  # loss -> (base, importance sampling on, online)
    "dpo": ("dpo", False, False), "isdpo": ("dpo", True, False), "online_dpo": ("dpo", False, True),
    "ipo": ("ipo", False, False), "isipo": ("ipo", True, False), "rpo": ("rpo", False, False),
}


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
# Student-t intervals, Holm, cross-fitting
# ----------------------------------------------------------------------------------------------------------

def test_t_interval_is_the_textbook_one_sample_t():
    values = [0.0, 1.0, 3.0]
    interval = t_interval(values)
    mean, se = 4 / 3, math.sqrt(((0 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 2 / 3)
    half = 4.302652729911275 * se  # t_{2, 0.975}, from a table
    assert (interval.mean, interval.low, interval.high) == pytest.approx((mean, mean - half, mean + half))
    assert (interval.n, interval.df) == (3, 2)
    scipy_result = scipy_stats.ttest_1samp(values, 0.0)  # an independent implementation of the same test
    assert interval.p == pytest.approx(scipy_result.pvalue)
    assert (interval.low, interval.high) == pytest.approx(tuple(scipy_result.confidence_interval(0.95)))


def test_one_value_nan_and_nothing_give_no_interval_and_identical_values_an_exact_one():
    one = t_interval([0.7, float("nan"), None])
    assert one.mean == 0.7 and one.n == 1 and not one.defined and one.verdict == "n/a" and math.isnan(one.p)
    assert report_stats.format_interval(one) == "0.700 [n/a]"
    empty = t_interval([])
    assert math.isnan(empty.mean) and empty.n == 0
    assert "no interval" in report_stats.claim("beta=0.1", "isdpo", "dpo", "final win rate", one)
    same = t_interval([0.5, 0.5, 0.5])  # no spread (exactly: 0.5 is a binary fraction): the mean is exact
    assert (same.low, same.high, same.p, same.verdict) == (0.5, 0.5, 0.0, "excludes zero")
    assert t_interval([0.0, 0.0]).p == 1.0


def test_instances_interval_is_a_t_interval_across_instance_means():
    strata = [[0.0, 1.0], [2.0, 4.0], [5.0, 5.0, 5.0], [float("nan")]]  # the last has no value: left out
    interval = instances_interval(strata)
    across = t_interval([0.5, 3.0, 5.0])
    assert (interval.mean, interval.low, interval.high, interval.p) == pytest.approx(
        (across.mean, across.low, across.high, across.p))
    assert (interval.n, interval.n_strata, interval.df) == (7, 3, 2)
    # Unequal instances: the mean of instance means, not of all values.
    assert instances_interval([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0]]).mean == pytest.approx(0.5)
    # One instance: nothing to generalise over; its own interval over seeds.
    assert instances_interval([[0.0, 1.0, 3.0]]) == t_interval([0.0, 1.0, 3.0])


def coverage(draw, true_mean, n, reps=4000, seed=0):
    """Fraction of ``reps`` intervals from ``n`` draws that contain ``true_mean`` (docs/method.md §7 quotes these
    numbers: same seed, same reps)."""
    rng = np.random.default_rng(seed)
    return sum(iv.low <= true_mean <= iv.high for iv in (t_interval(draw(rng, n)) for _ in range(reps))) / reps


@pytest.mark.parametrize("n", [3, 5, 10])
def test_t_interval_covers_95_percent_of_normal_means(n):
    measured = coverage(lambda rng, k: rng.normal(0.0, 1.0, k), 0.0, n)
    assert 0.93 <= measured <= 0.97, measured  # 4000 reps: binomial sd 0.0034 around 0.95


def test_t_interval_undercovers_skewed_data_as_documented():
    """Lognormal(0, 1) values (mean e^0.5): the t-interval covers ~84% at n = 3 and n = 10 (docs/method.md §7)."""
    for n in (3, 10):
        measured = coverage(lambda rng, k: rng.lognormal(0.0, 1.0, k), math.exp(0.5), n)
        assert 0.80 <= measured <= 0.88, (n, measured)


def test_holm_by_hand_and_nan_is_no_test():
    adjusted, rejected = report_stats.holm([0.01, 0.04, 0.03, float("nan")])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert list(rejected) == [True, False, False, False]
    assert report_stats.holm([])[0].size == 0


def test_sign_test_by_hand():
    assert report_stats.sign_test(10, 0) == pytest.approx(2 / 2 ** 10)  # both tails of the all-one-way outcome
    assert report_stats.sign_test(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)  # P(X <= 2) + P(X >= 8)
    assert report_stats.sign_test(5, 5) == pytest.approx(1.0) and math.isnan(report_stats.sign_test(0, 0))


@pytest.mark.parametrize("effects", ["normal", "cauchy"])
def test_sign_test_holds_its_level_over_instances_whatever_their_spread(effects):
    """Instance effects symmetric about zero (H0), normal or Cauchy (no mean, no variance): at K = 10 the sign
    test rejects at 0.05 with the exact probability 22/1024 = 0.021 (conservative: the binomial has no outcome
    between 0.021 and 0.109); 4000 draws, binomial sd 0.0023. A consistent shift is found: power at K = 10."""
    rng = np.random.default_rng(11)
    draw = {"normal": lambda: rng.normal(0.0, 1.0, 10), "cauchy": lambda: rng.standard_cauchy(10)}[effects]

    def rejects(shift: float) -> float:
        hits = 0
        for _ in range(4000):
            x = draw() + shift
            hits += report_stats.sign_test(int((x > 0).sum()), int((x < 0).sum())) < 0.05
        return hits / 4000

    assert abs(rejects(0.0) - 22 / 1024) < 0.008
    assert rejects(3.0) > 0.5  # normal: P(x > 0) = 0.9987 per instance; Cauchy: 0.90


def test_cross_fit_by_hand():
    peak, drop = report_stats.cross_fit([0.5, 0.9, 0.6], [0.6, 0.7, 0.8])
    # argmax A = 1: B there 0.7, B final 0.8; argmax B = 2: A there 0.6, A final 0.6
    assert peak == pytest.approx((0.7 + 0.6) / 2) and drop == pytest.approx(((0.7 - 0.8) + (0.6 - 0.6)) / 2)


FLAT_RUNS, FLAT_POINTS, HALF_PROMPTS = 2000, 26, 500


def flat_curves(seed=0):
    """Win rates of ``FLAT_RUNS`` curves that are flat at 0.7: each of ``FLAT_POINTS`` points measured on two
    halves of 500 prompts (binomial noise), as evaluate.py's win_rate_a / win_rate_b."""
    rng = np.random.default_rng(seed)
    a = rng.binomial(HALF_PROMPTS, 0.7, size=(FLAT_RUNS, FLAT_POINTS)) / HALF_PROMPTS
    b = rng.binomial(HALF_PROMPTS, 0.7, size=(FLAT_RUNS, FLAT_POINTS)) / HALF_PROMPTS
    return a, b


def test_cross_fitted_drop_of_a_flat_curve_is_zero_and_the_same_sample_drop_is_not():
    """On a curve without a peak the same-sample drop (max - last of the full win rate) is positive by
    construction (the max of noise); the cross-fitted drop has mean zero (numbers in docs/method.md §7)."""
    a, b = flat_curves()
    crossed = np.array([report_stats.cross_fit(x, y)[1] for x, y in zip(a, b)])
    full = (a + b) / 2
    same_sample = full.max(axis=1) - full[:, -1]
    se_crossed, se_same = crossed.std(ddof=1) / math.sqrt(FLAT_RUNS), same_sample.std(ddof=1) / math.sqrt(FLAT_RUNS)
    assert abs(crossed.mean()) < 3 * se_crossed, (crossed.mean(), se_crossed)
    assert same_sample.mean() > 20 * se_same and same_sample.mean() > 0.02, (same_sample.mean(), se_same)


def test_cross_fitted_peak_of_a_real_peak_is_close_and_not_above_it():
    """A curve that rises to 0.8 at point 10 and falls to 0.6: the cross-fitted peak is unbiased for the true value
    at the chosen point, so on average at most the true maximum (conservative) and near it when the peak is clear."""
    rng = np.random.default_rng(1)
    true = np.concatenate([np.linspace(0.6, 0.8, 11), np.linspace(0.78, 0.6, 15)])
    peaks, drops = [], []
    for _ in range(1000):
        a, b = (rng.binomial(HALF_PROMPTS, true) / HALF_PROMPTS for _ in range(2))
        peak, drop = report_stats.cross_fit(a, b)
        peaks.append(peak)
        drops.append(drop)
    assert 0.78 < np.mean(peaks) < 0.8 and 0.18 < np.mean(drops) < 0.2  # measured: 0.791 and 0.191


def test_paired_differences_counts_unpaired_and_nan():
    diffs, only_a, only_b = report_stats.paired_differences({0: 0.6, 1: 0.7, 2: 0.8, 3: float("nan")},
                                                 {0: 0.5, 1: 0.5, 4: 0.1, 3: 0.2})
    assert diffs == pytest.approx({0: 0.1, 1: 0.2}) and only_a == [2] and only_b == [4, 3]


# ----------------------------------------------------------------------------------------------------------
# Report: statistics, pairing, claims
# ----------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3)
DPO_FINAL = {(c, s): 0.55 + 0.03 * s - 0.02 * c for c in (0, 1) for s in SEEDS}
# isipo - ipo per seed: mean +0.01 on chain_seed 0 and -0.01 on chain_seed 1 (pooled: zero), spread far wider
NOISE = {0: (0.06, -0.04, 0.04, -0.02), 1: (0.04, -0.06, 0.02, -0.04)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """dpo, isdpo (= dpo + 0.1 exactly), ipo, isipo (= ipo + ``NOISE``), online_dpo (= dpo - 0.2 on
    chain_seed 0, missing seed 3), at beta 0.1, chain_seed 0 and 1, seeds 0-3; plus one failed isdpo run."""
    root = tmp_path_factory.mktemp("stats") / "sweep"
    for c in (0, 1):
        for s in SEEDS:
            final = DPO_FINAL[(c, s)]
            write_fake(root, "dpo", 0.1, s, c, final, kl=1.0 + s)
            write_fake(root, "isdpo", 0.1, s, c, final + 0.1, kl=0.5 + s)
            write_fake(root, "ipo", 0.1, s, c, final)
            write_fake(root, "isipo", 0.1, s, c, final + NOISE[c][s])
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
    assert text == ("beta=0.1, chain_seed=1: isdpo - dpo final win rate +0.100 [+0.100, +0.100] (4 seeds, "
                    "p < 0.001): the interval excludes zero: isdpo higher")
    pooled = claim_of(rows, "isdpo - dpo", "final_win_rate", "pooled over 2")["claim"]
    assert pooled.startswith("beta=0.1: isdpo - dpo final win rate: higher on 2 of 2 instances (interval above zero "
                             "on 2, below on 0); pooled +0.100 [+0.100, +0.100] treating instances as random (K=2, "
                             "p < 0.001)")
    kl = claim_of(rows, "isdpo - dpo", "max_kl", "pooled over 2")
    assert kl["mean"] == pytest.approx(-0.5) and kl["claim"].endswith("dpo higher")
    # The failed isdpo run (seed 9) is neither paired nor counted as unpaired: it is not a result.
    assert all(r["n_unpaired"] == 0 for r in rows if r["comparison"] == "isdpo - dpo")


def test_paired_difference_noise_includes_zero(grid):
    rows = report_claims.claim_rows(report_runs.load_sweep(grid))
    for instance, mean in (("chain_seed=0", 0.01), ("chain_seed=1", -0.01), ("pooled over 2", 0.0)):
        row = claim_of(rows, "isipo - ipo", "final_win_rate", instance)
        assert row["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "includes zero"
        assert row["claim"].endswith("the interval includes zero: no difference shown")
        assert not row["survives_holm"] and row["p_holm"] >= row["p"] > 0.05
    pooled = claim_of(rows, "isipo - ipo", "final_win_rate", "pooled over 2")
    assert (pooled["n_higher"], pooled["n_lower"], pooled["n_above_zero"], pooled["n_below_zero"]) == (1, 1, 0, 0)
    assert ": higher on 1 of 2 instances, lower on 1 (interval above zero on 0, below on 0); pooled" in \
        pooled["claim"]


def test_unpaired_runs_are_left_out_and_counted(grid):
    rows = report_claims.claim_rows(report_runs.load_sweep(grid))
    row = claim_of(rows, "online_dpo - dpo", "final_win_rate", "chain_seed=0")
    assert row["n_pairs"] == 3 and row["n_unpaired"] == 1 and row["unpaired"] == "dpo seed 3"
    assert row["mean"] == pytest.approx(-0.2) and "(3 seeds, p < 0.001; 1 unpaired run left out)" in row["claim"]
    pooled = claim_of(rows, "online_dpo - isdpo", "final_win_rate", "pooled over 2")
    assert pooled["n_pairs"] == 6 and pooled["n_unpaired"] == 2 and pooled["mean"] == pytest.approx(-0.3)
    assert "treating instances as random (K=2, " in pooled["claim"] and "; 2 unpaired runs left out)" in \
        pooled["claim"]


def test_statistics_rows_per_instance_and_pooled(grid):
    rows = report_tables.statistics_rows(report_runs.load_sweep(grid))
    dpo = {r["instance"]: r for r in rows if r["loss"] == "dpo" and r["metric"] == "final_win_rate"}
    assert set(dpo) == {"chain_seed=0", "chain_seed=1", "pooled over 2"}
    for c in (0, 1):
        values = [DPO_FINAL[(c, s)] for s in SEEDS]
        row = dpo[f"chain_seed={c}"]
        expected = t_interval(values)
        assert (row["n"], row["seeds"], row["mean"]) == (4, "0 1 2 3", pytest.approx(np.mean(values)))
        assert (row["ci_low"], row["ci_high"]) == (expected.low, expected.high)
    pooled = dpo["pooled over 2"]
    strata = [[DPO_FINAL[(c, s)] for s in SEEDS] for c in (0, 1)]
    assert (pooled["n_instances"], pooled["n"]) == (2, 8)
    assert pooled["mean"] == pytest.approx(np.mean([np.mean(s) for s in strata]))
    across = t_interval([np.mean(s) for s in strata])  # instances a random sample: t across their means
    assert (pooled["ci_low"], pooled["ci_high"]) == pytest.approx((across.low, across.high))
    assert (pooled["df"], pooled["interval_over"]) == (1, "instances")
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
    # 4 comparisons x the claim metrics but the golden reward (these runs log none) x (2 instances + pooled)
    metrics = [q for q in CLAIM_QUANTITIES if q != "final_golden_reward"]
    assert len(claims) == 4 * len(metrics) * 3 and {r["metric"] for r in claims} == set(metrics)
    row = next(r for r in claims if r["comparison"] == "isdpo - dpo" and r["metric"] == "final_win_rate"
               and r["level"] == "pooled")
    assert float(row["mean"]) == pytest.approx(0.1) and row["verdict"] == "excludes zero"
    assert row["claim"] in md.split("## Claims")[1]
    # Holm over the whole family: every claim row with a test, recomputed here with statsmodels.
    tested = [r for r in claims if r["p"] != "nan"]
    expected = multipletests([float(r["p"]) for r in tested], alpha=0.05, method="holm")
    assert [float(r["p_holm"]) for r in tested] == pytest.approx(list(expected[1]))
    assert [r["survives_holm"] == "True" for r in tested] == list(expected[0])
    assert f"Holm's correction over the family of all {len(tested)} claims" in md
    survivor = next(r for r in claims if r["survives_holm"] == "True")
    assert f"- {survivor['claim']} — **✓ survives Holm" in md
    loser = next(r for r in claims if r["survives_holm"] == "False" and r["p"] != "nan")
    assert f"- {loser['claim']} — ✗ not after Holm" in md
    # The sign test over instances, on pooled rows only, with a Holm family of its own.
    pooled = [r for r in claims if r["level"] == "pooled"]
    assert all(r["p_sign"] == "nan" for r in claims if r["level"] == "instance")
    for r in pooled:
        assert float(r["p_sign"]) == pytest.approx(report_stats.sign_test(int(r["n_higher"]), int(r["n_lower"])),
                                                   nan_ok=True)  # NaN: no instance differs
    signed = [r for r in pooled if r["p_sign"] != "nan"]
    expected = multipletests([float(r["p_sign"]) for r in signed], alpha=0.05, method="holm")
    assert [float(r["p_sign_holm"]) for r in signed] == pytest.approx(list(expected[1]))
    assert f"corrected by Holm over the {len(signed)} sign tests" in md
    assert f"- {row['claim']}" in md and "sign test over instances p = 0.5" in md  # 2 of 2 instances higher
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
    claim = next(r for r in report_claims.claim_rows(report_runs.load_sweep(tmp_path))
                 if r["metric"] == "final_win_rate")
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


def names(pairs):
    """Compared arms as (a, b) loss names."""
    return [(a.name, b.name) for a, b in pairs]


def test_comparisons_from_the_loss_config_and_the_name_fallback(tmp_path):
    # Config first: an importance-sampled loss named freely is compared with the loss of its loss.base.
    TRAITS["weighted"] = ("ipo", True, False)
    try:
        for loss in ("dpo", "ipo", "weighted", "rpo", "online_dpo", "isdpo"):
            write_fake(tmp_path / "a", loss, 0.1, 0, 0, 0.6)
        assert names(report_claims.comparisons(report_runs.load_sweep(tmp_path / "a"))) == [
            ("isdpo", "dpo"), ("weighted", "ipo"), ("online_dpo", "dpo"), ("online_dpo", "isdpo")]
    finally:
        del TRAITS["weighted"]
    # No config: the name ("is" prefix) decides.
    for loss in ("dpo", "isdpo"):
        folder = write_fake(tmp_path / "b", loss, 0.1, 0, 0, 0.6)
        (folder / ".hydra" / "config.yaml").unlink()
    assert names(report_claims.comparisons(report_runs.load_sweep(tmp_path / "b"))) == [("isdpo", "dpo")]


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
    assert names(report_claims.comparisons(runs)) == expected
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


def test_a_clip_free_arm_is_its_own_series_and_compared_with_its_base(tmp_path):
    """loss=isdpo with loss.importance_sampling.log_clip=null beside loss=isdpo and loss=dpo (composed configs):
    its own row, series and claims against dpo; dpo's label carries no importance-sampling setting (it has none
    switched on), its table cell says so."""
    for seed in (0, 1):
        write_real_run(tmp_path, ["loss=dpo", f"seed={seed}"], tag="")
        write_real_run(tmp_path, ["loss=isdpo", f"seed={seed}"], tag="")
        write_real_run(tmp_path, ["loss=isdpo", "loss.importance_sampling.log_clip=null", f"seed={seed}"],
                       tag="noclip")
    runs = report_runs.load_sweep(tmp_path)
    assert {r.series for r in runs} == {"dpo", "isdpo, log_clip=2", "isdpo, log_clip=null"}
    clip = "loss.importance_sampling.log_clip"
    assert [(r["loss"], r[clip], r["n_seeds"]) for r in report_tables.summarise(runs)] == [
        ("dpo", "(IS off)", 2), ("isdpo", "2", 2), ("isdpo", "null", 2)]
    assert names(report_claims.comparisons(runs)) == [("isdpo", "dpo")]
    rows = [r for r in report_claims.claim_rows(runs) if r["metric"] == "final_win_rate"]
    assert [(r["comparison"], r["n_pairs"], r["n_unpaired"]) for r in rows] == [
        ("isdpo, log_clip=2 - dpo", 2, 0), ("isdpo, log_clip=null - dpo", 2, 0)]


def test_online_and_importance_sampling_are_read_from_the_config(tmp_path):
    """An online loss named freely (a conf/loss/online_ipo.yaml: loss.online=true, base ipo) is compared with the
    offline and importance-sampled losses of its base; loss=ipo loss.online=true, the same name as the offline
    ipo runs, is another arm (the config says so, not the name)."""
    TRAITS["online_ipo"] = ("ipo", False, True)
    try:
        for loss in ("dpo", "ipo", "isipo", "online_ipo"):
            write_fake(tmp_path / "a", loss, 0.1, 0, 0, 0.6)
        runs = report_runs.load_sweep(tmp_path / "a")
        assert report_runs.loss_traits(next(r for r in runs if r.loss == "online_ipo")) == (False, True, "ipo")
        assert names(report_claims.comparisons(runs)) == [("isipo", "ipo"), ("online_ipo", "ipo"),
                                                          ("online_ipo", "isipo")]
    finally:
        del TRAITS["online_ipo"]
    for seed in (0, 1):
        write_real_run(tmp_path / "b", ["loss=ipo", f"seed={seed}"], tag="")
        write_real_run(tmp_path / "b", ["loss=ipo", "loss.online=true", f"seed={seed}"], tag="online")
    runs = report_runs.load_sweep(tmp_path / "b")
    (pair,) = report_claims.comparisons(runs)
    assert [(arm.name, arm.online, arm.weighted, arm.base) for arm in pair] == [("ipo", True, False, "ipo"),
                                                                                ("ipo", False, False, "ipo")]
    rows = [r for r in report_claims.claim_rows(runs) if r["metric"] == "final_win_rate"]
    assert [(r["comparison"], r["n_pairs"]) for r in rows] == [("ipo, online=true - ipo, online=false", 2)]
