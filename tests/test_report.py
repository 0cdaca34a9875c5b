"""isdpo.report on a hand-written fake sweep: table numbers, listing of failed runs, figures, CLI, W&B fallback."""
import csv
import json
import os
import shutil
import sys
import time
import types
import zlib

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from isdpo.report import __main__ as report_cli
from isdpo.report import build as report_build
from isdpo.report import files as report_files
from isdpo.report import plots as report_plots
from isdpo.report import quantities as report_quantities
from isdpo.report import runs as report_runs
from isdpo.report import stats as report_stats
from isdpo.report import tables as report_tables
from isdpo.report import wandb as report_wandb
from isdpo import artifacts, run_guard
from isdpo.tracking import run_summary
from tests.hydra_utils import compose_cfg
from tests.wandb_records import offline_run

LOSSES, BETAS, SEEDS = ("dpo", "isdpo"), (0.01, 0.1), (0, 1)
STEPS = (0, 10, 20, 30, 40)


def metrics_rows(loss, beta, seed, steps=STEPS, tag=""):
    """Deterministic, distinct curves per run (and per ``tag``): dpo rises then falls, isdpo keeps rising."""
    rng = np.random.default_rng(zlib.crc32(f"{loss}-{beta}-{seed}{tag}".encode()))
    rows = []
    for i, step in enumerate(steps):
        rise = 0.08 * i if loss == "isdpo" else 0.15 * i - 0.05 * i * i
        kl = (0.3 if loss == "isdpo" else 1.5) * i / (1 + 10 * beta) + rng.uniform(0, 0.2) * (i > 0)
        rows.append({"step": step, "epoch": 0, "win_rate": round(0.5 + rise + rng.uniform(-0.03, 0.03), 4),
                     "kl": round(kl, 4), "kl_k1": round(kl * 1.1, 4),
                     "golden_reward": 1.0 + i + (0.5 * i if loss == "isdpo" else 0.0),
                     "reference_golden_reward": 1.0, "policy_logp": -10.0 + i, "response_length": 10.0,
                     "n_samples": 100})
    return rows


def write_hydra(folder, loss, beta, seed, task="synthetic"):
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"task:\n  name: {task}\nloss:\n  name: {loss}\n  base: dpo\nexperiment: fake\nbeta: {beta}\n"
        f"seed: {seed}\nrun_name: ${{loss.name}}-b${{beta}}-s${{seed}}\n")
    (folder / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- beta={beta}\n- seed={seed}\n")


def write_run(folder, loss, beta, seed, *, result=True, judge=None, status="completed"):
    write_hydra(folder, loss, beta, seed)
    rows = metrics_rows(loss, beta, seed)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if result:
        res = {"status": status, "task": "synthetic", "loss": loss, "beta": beta, "seed": seed,
               "run_name": f"{loss}-b{beta}-s{seed}", "experiment": "fake", "final": rows[-1],
               "peak": max(rows, key=lambda r: r["win_rate"]), "n_eval_points": len(rows), "train_seconds": 1.0,
               "reference_dir": "/nowhere", "output_dir": str(folder)}
        if judge is not None:
            res["judge"] = {"win_rate": judge, "n": 256}
        (folder / "result.json").write_text(json.dumps(res, indent=2))
    return rows


def job(root, loss, beta, seed):
    return root / f"beta={beta},loss={loss},seed={seed}"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 losses x 2 betas x 2 seeds completed, one incomplete run (metrics, no result.json), one crashed (.hydra).

    Module-scoped, and read-only for the tests: building it and drawing its figures once keeps the file fast.
    """
    root = tmp_path_factory.mktemp("sweep") / "multirun" / "fake"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for loss in LOSSES:
        for beta in BETAS:
            for seed in SEEDS:
                # A judge win rate on the dpo runs only: the column must appear, with "–" for isdpo.
                write_run(job(root, loss, beta, seed), loss, beta, seed,
                          judge=0.4 + 0.1 * seed + beta if loss == "dpo" else None)
    write_run(job(root, "dpo", 0.1, 2), "dpo", 0.1, 2, result=False)  # incomplete
    write_hydra(job(root, "isdpo", 0.01, 2), "isdpo", 0.01, 2)  # crashed before the first evaluation
    return root


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    """The full report of ``sweep`` (figures included), built once: its output folder."""
    out = tmp_path_factory.mktemp("report")
    report_build.build_report(sweep, out, log=lambda msg: None)
    return out


def expected_stats(root, loss, beta, get):
    """Mean and sample std (ddof 1), computed here from the result.json files with numpy."""
    values = [get(json.loads((job(root, loss, beta, s) / "result.json").read_text())) for s in SEEDS]
    return float(np.mean(values)), float(np.std(values, ddof=1))


QUANTITIES = {
    "final_win_rate": lambda r: r["final"]["win_rate"],
    "peak_win_rate": lambda r: r["peak"]["win_rate"],
    "peak_step": lambda r: r["peak"]["step"],
    "final_kl": lambda r: r["final"]["kl"],
    "drop": lambda r: r["peak"]["win_rate"] - r["final"]["win_rate"],
}


def test_discovery_and_classification(sweep):
    runs = {r.name: r for r in report_runs.load_sweep(sweep)}
    assert len(runs) == 10  # 8 completed + incomplete + crashed; multirun.yaml and .hydra are not runs
    assert sum(r.ok for r in runs.values()) == 8
    incomplete = runs["beta=0.1,loss=dpo,seed=2"]
    assert (incomplete.status, incomplete.loss, incomplete.beta, incomplete.seed) == ("incomplete", "dpo", 0.1, 2)
    assert "no result.json" in incomplete.reason and "5 eval points" in incomplete.reason
    crashed = runs["beta=0.01,loss=isdpo,seed=2"]
    # Identity from .hydra/config.yaml alone.
    assert (crashed.status, crashed.task, crashed.loss, crashed.beta, crashed.seed) == \
        ("failed", "synthetic", "isdpo", 0.01, 2)
    assert "no metrics.jsonl" in crashed.reason


def test_table_numbers_equal_result_files(sweep, built):
    out = built
    md = (out / "report.md").read_text()
    rows = {(r["loss"], r["beta"]): r for r in report_tables.summarise(report_runs.load_sweep(sweep))}
    assert set(rows) == {(loss, beta) for loss in LOSSES for beta in BETAS}
    with open(out / "summary.csv") as f:
        csv_rows = {(r["loss"], float(r["beta"])): r for r in csv.DictReader(f)}
    for loss in LOSSES:
        for beta in BETAS:
            row = rows[(loss, beta)]
            assert row["n_seeds"] == 2 and row["seeds"] == "0 1"  # the incomplete seed 2 is not counted
            assert int(csv_rows[(loss, beta)]["n_seeds"]) == 2
            for col, get in QUANTITIES.items():
                mean, std = expected_stats(sweep, loss, beta, get)
                assert row[f"{col}_mean"] == pytest.approx(mean, abs=1e-12)
                assert row[f"{col}_std"] == pytest.approx(std, abs=1e-12)
                assert float(csv_rows[(loss, beta)][f"{col}_mean"]) == pytest.approx(mean, abs=1e-12)
                assert float(csv_rows[(loss, beta)][f"{col}_std"]) == pytest.approx(std, abs=1e-12)
            mean, std = expected_stats(sweep, loss, beta, QUANTITIES["final_win_rate"])
            assert f"{mean:.3f} ± {std:.3f}" in md
            mean, std = expected_stats(sweep, loss, beta, QUANTITIES["final_kl"])
            assert f"{mean:.3g} ± {std:.3g}" in md
            if loss == "dpo":
                mean, std = expected_stats(sweep, loss, beta, lambda r: r["judge"]["win_rate"])
                assert row["judge_win_rate_mean"] == pytest.approx(mean)
                assert f"{mean:.3f} ± {std:.3f}" in md
            else:
                assert row["judge_win_rate_n"] == 0
    assert "| judge win rate |" in md and "Columns in `code`" not in md  # nothing but loss/beta/seed varies
    # One Markdown row per loss x beta in the summary (the Statistics section that follows has its own tables).
    assert sum(line.startswith("| `") for line in md.split("## Statistics")[0].splitlines()) == 4


def test_report_lists_incomplete_and_failed_runs(built):
    md = (built / "report.md").read_text()
    failed = md.split("## Incomplete and failed runs")[1]
    assert "`beta=0.1,loss=dpo,seed=2`" in failed and "incomplete" in failed and "no result.json" in failed
    assert "`beta=0.01,loss=isdpo,seed=2`" in failed and "failed" in failed
    assert "8 completed, 1 incomplete, 1 failed" in md
    runs_csv = (built / "runs.csv").read_text()
    assert "beta=0.1,loss=dpo,seed=2" in runs_csv and "beta=0.01,loss=isdpo,seed=2" in runs_csv


def test_other_failures_are_listed_with_their_reason(tmp_path):
    root = tmp_path / "sweep"
    write_run(job(root, "dpo", 0.1, 0), "dpo", 0.1, 0)
    write_run(job(root, "dpo", 0.1, 1), "dpo", 0.1, 1, status="failed")
    write_run(job(root, "dpo", 0.1, 2), "dpo", 0.1, 2)
    (job(root, "dpo", 0.1, 2) / "metrics.jsonl").write_text("")  # result.json but empty metrics
    write_run(job(root, "dpo", 0.1, 3), "dpo", 0.1, 3)
    (job(root, "dpo", 0.1, 3) / "result.json").write_text("{not json")
    # A run still being written: a half-written last line is skipped, not fatal.
    folder = job(root, "isdpo", 0.1, 0)
    write_run(folder, "isdpo", 0.1, 0, result=False)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "win_')
    # A rerun of seed 0 elsewhere in the tree, written later: it replaces the older one.
    rerun = root / "rerun" / "again"
    write_run(rerun, "dpo", 0.1, 0)
    old = time.time() - 100
    os.utime(job(root, "dpo", 0.1, 0) / "result.json", (old, old))

    runs = {r.name: r for r in report_runs.load_sweep(root)}
    assert runs["beta=0.1,loss=dpo,seed=1"].status == "failed"
    assert runs["beta=0.1,loss=dpo,seed=1"].reason.startswith("status = 'failed'")
    assert runs["beta=0.1,loss=dpo,seed=2"].reason.startswith("empty metrics")
    assert "unreadable" in runs["beta=0.1,loss=dpo,seed=3"].reason
    assert runs["beta=0.1,loss=isdpo,seed=0"].status == "incomplete"
    assert len(runs["beta=0.1,loss=isdpo,seed=0"].metrics) == len(STEPS)
    assert runs["beta=0.1,loss=dpo,seed=0"].status == "duplicate"
    assert runs["rerun/again"].ok
    md = report_build.build_report(root, tmp_path / "rep", figures=False, log=lambda msg: None).read_text()
    for name in ("beta=0.1,loss=dpo,seed=1", "beta=0.1,loss=dpo,seed=2", "beta=0.1,loss=dpo,seed=3",
                 "beta=0.1,loss=isdpo,seed=0", "beta=0.1,loss=dpo,seed=0"):
        assert f"`{name}`" in md.split("## Incomplete and failed runs")[1]
    assert "1 malformed line(s)" in md


@pytest.mark.parametrize("show_seeds", [True, False])
def test_figures_panels_lines_and_colours(sweep, show_seeds):
    runs = [r for r in report_runs.load_sweep(sweep) if r.ok]
    colours = report_plots.loss_colours(LOSSES)
    per_loss_lines = 1 + (len(SEEDS) if show_seeds else 0)  # the seed mean, plus one thin line per seed
    # The against-step figures (the over-optimization figure has its own test: points and bins, not seed lines).
    expected = {report_plots.plot_win_rate_vs_step: len(LOSSES) * per_loss_lines + 1,  # + the 0.5 line
                report_plots.plot_kl_vs_step: len(LOSSES) * per_loss_lines}
    for plot, n_lines in expected.items():
        fig = plot(runs, colours, task="synthetic", show_seeds=show_seeds)
        assert len(fig.axes) == len(BETAS)
        titles = [ax.get_title() for ax in fig.axes]
        assert [t.split("  ")[0] for t in titles] == [f"β = {b:g}" for b in BETAS]
        for ax in fig.axes:
            assert len(ax.lines) == n_lines
            assert ax.get_xlabel() and ax.get_ylabel()
            means = {line.get_label(): line for line in ax.lines if line.get_label() in LOSSES}
            assert set(means) == set(LOSSES)
            for loss, line in means.items():
                assert line.get_color() == colours[loss]
                assert len(line.get_xdata()) == len(STEPS)
        legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert [t for t in legend_texts if t.split(" ")[0] in LOSSES] == [f"{l} (mean over seeds)" for l in LOSSES]
        assert fig._suptitle.get_text()
        report_plots.plt.close(fig)


def test_overoptimization_points_and_bins(sweep):
    """All evaluation points are drawn; the line is the mean win rate of equal-count bins of sqrt KL."""
    runs = [r for r in report_runs.load_sweep(sweep) if r.ok]
    colours = report_plots.loss_colours(LOSSES)
    fig = report_plots.plot_overoptimization(runs, colours, task="synthetic")
    assert len(fig.axes) == len(BETAS)
    assert len({ax.get_xlim() for ax in fig.axes}) == 1  # one x-range for every beta
    for ax, beta in zip(fig.axes, BETAS):
        assert len(ax.lines) == len(LOSSES) + 1  # a binned line per loss + the 0.5 line
        for loss in LOSSES:
            rows = [row for s in SEEDS for row in metrics_rows(loss, beta, s)]
            x = np.sqrt([r["kl"] for r in rows])
            y = np.array([r["win_rate"] for r in rows])
            points = next(c for c in ax.collections if c.get_offsets().shape[0] == len(rows)
                          and np.allclose(np.sort(c.get_offsets()[:, 0]), np.sort(x)))
            assert points.get_alpha() < 0.5
            line = next(line for line in ax.lines if line.get_label() == loss)
            order = np.argsort(x, kind="stable")
            bins = np.array_split(order, report_stats.default_bins(len(rows)))
            assert np.allclose(line.get_xdata(), [x[b].mean() for b in bins])
            assert np.allclose(line.get_ydata(), [y[b].mean() for b in bins])
    report_plots.plt.close(fig)


def test_seed_mean_is_the_mean_at_each_step(sweep):
    runs = [r for r in report_runs.load_sweep(sweep) if r.ok and r.loss == "dpo" and r.beta == 0.01]
    fig = report_plots.plot_win_rate_vs_step(runs, report_plots.loss_colours(["dpo"]), show_seeds=True)
    mean_line = next(line for line in fig.axes[0].lines if line.get_label() == "dpo")
    per_seed = np.array([[r["win_rate"] for r in metrics_rows("dpo", 0.01, s)] for s in SEEDS])
    assert np.allclose(mean_line.get_ydata(), per_seed.mean(axis=0))
    assert list(mean_line.get_xdata()) == list(STEPS)
    report_plots.plt.close(fig)


def test_colours_are_consistent_and_distinct():
    colours = report_plots.loss_colours(["isdpo", "dpo", "zeta", "alpha"])
    assert colours["dpo"] == report_plots.KNOWN_LOSS_COLOURS["dpo"]
    assert colours == report_plots.loss_colours(["alpha", "zeta", "dpo", "isdpo"])
    assert len(set(colours.values())) == 4
    assert report_plots.loss_order(["zeta", "isdpo", "alpha", "dpo"]) == ["dpo", "isdpo", "alpha", "zeta"]


def test_pngs_embedded_and_sized(built):
    out = built
    md = (out / "report.md").read_text()
    width = round(len(BETAS) * report_plots.PANEL_WIDTH_IN * report_plots.DPI)
    height = round(report_plots.FIG_HEIGHT_IN * report_plots.DPI)
    for stem in ("overopt", "win_rate_vs_step", "kl_vs_step"):
        png = out / f"{stem}_synthetic.png"
        assert f"]({png.name})" in md
        with Image.open(png) as im:
            assert im.format == "PNG"
            # the panels' height plus the legend's below them (report_plots._finish)
            assert im.size[0] == width and height < im.size[1] < 1.6 * height


def test_cli_default_out_inside_sweep_is_not_a_run(sweep, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(sweep, root)
    assert report_cli.main([str(root), "--no-figures"]) == 0
    assert f"wrote {root / 'report' / 'report.md'}" in capsys.readouterr().out
    assert report_cli.main([str(root), "--no-figures"]) == 0  # again: the report folder is not discovered as a run
    assert "10 found" in (root / "report" / "report.md").read_text()
    assert len(report_runs.discover(root)) == 10


def test_empty_directory_is_an_error_and_leaves_no_report_folder(tmp_path, capsys):
    assert report_cli.main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty report/ left behind


def test_a_read_only_sweep_folder_says_where_and_suggests_out(sweep, tmp_path, monkeypatch, capsys):
    """Writing into a sweep folder one may not write to: a message naming the path and --out, exit 1, no
    traceback. (Simulated: the tests run as root, for whom chmod does not forbid writing.)"""
    real_mkdir = type(tmp_path).mkdir

    def mkdir(self, *args, **kwargs):
        if self == sweep / "report":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir)
    assert report_cli.main([str(sweep), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write the report into {sweep / 'report'}: Permission denied" in err and "--out DIR" in err
    assert report_cli.main([str(sweep), "--no-figures", "--out", str(tmp_path / "elsewhere")]) == 0


def test_report_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails halfway leaves the previous file as it was and no temporary file (the report is read
    while sweeps run and may be rebuilt at any time)."""
    path = tmp_path / "summary.csv"
    report_tables.write_csv(path, [{"a": 1, "b": 2}])
    before = path.read_bytes()

    def fail_halfway(self, rows):
        self.writer.writerow(["half"])
        raise RuntimeError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail_halfway)
    with pytest.raises(RuntimeError):
        report_tables.write_csv(path, [{"a": 3, "b": 4}])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]

    png = tmp_path / "fig.png"
    fig = report_plots.plt.figure()
    report_plots.save_figure(fig, png)
    old_png, old_svg = png.read_bytes(), report_plots.svg_path(png).read_bytes()

    def savefig(self, fname, **kwargs):
        open(fname, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(report_plots.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        report_plots.save_figure(report_plots.plt.figure(), png)
    assert (png.read_bytes(), report_plots.svg_path(png).read_bytes()) == (old_png, old_svg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig.svg", "summary.csv"]

    report_files.write_text(tmp_path / "report.md", "old")
    monkeypatch.setattr(type(tmp_path), "write_text", lambda self, text: (open(self, "w").write(text[:2]),
                                                                          1 / 0))
    with pytest.raises(ZeroDivisionError):
        report_files.write_text(tmp_path / "report.md", "new text")
    assert (tmp_path / "report.md").read_text() == "old"


def fake_wandb(monkeypatch, api):
    module = types.ModuleType("wandb")
    module.Api = api
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_wandb_failure_is_reported_not_fatal(sweep, tmp_path, monkeypatch, capsys):
    def api(timeout=None):
        raise RuntimeError("No API key configured")

    fake_wandb(monkeypatch, api)
    assert report_cli.main([str(sweep), "--out", str(tmp_path / "rep"), "--wandb-project", "me/proj",
                        "--no-figures"]) == 0
    assert "could not fetch" in capsys.readouterr().out.lower()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Could not fetch runs from W&B: RuntimeError: No API key configured" in md
    assert "## Incomplete and failed runs" in md  # the local report is still complete


def test_wandb_hang_times_out(monkeypatch):
    def api(timeout=None):
        time.sleep(5)

    fake_wandb(monkeypatch, api)
    rows, error = report_wandb.fetch_wandb("me/proj", timeout_s=0.2)
    assert rows == [] and "no answer" in error


def test_wandb_summaries(monkeypatch):
    """An align run's summary as isdpo.tracking writes it (final/*, peak/*, drop/*, max/kl, status; eval/* then
    hold {"max", "last"}), one of a run with only the {"max", "last"} eval/* summaries, and one of older code
    (eval/* scalars: the last value, no max)."""
    curve = [{"step": 10, "win_rate": 0.8, "kl": 1.0}, {"step": 20, "win_rate": 0.75, "kl": 1.5}]
    eval_summaries = {"eval/win_rate": {"max": 0.8, "last": 0.75}, "eval/kl": {"max": 1.5, "last": 1.5},
                      "trainer/global_step": 20}
    summaries = {"new": {**eval_summaries, **run_summary("completed", curve, curve[0], "win_rate")},
                 "eval-only": eval_summaries, "old": {"eval/win_rate": 0.75, "eval/kl": 1.5}}
    runs = [types.SimpleNamespace(name=name, state="finished", job_type="align", group="fake",
                                  config={"loss": {"name": "dpo"}, "task": {"name": "synthetic"}, "beta": 0.1,
                                          "seed": 0}, summary_metrics=summary, url="https://x")
            for name, summary in summaries.items()]
    fake_wandb(monkeypatch, lambda timeout=None: types.SimpleNamespace(runs=lambda project: runs))
    rows, error = report_wandb.fetch_wandb("me/proj")
    assert error is None
    got = {r["name"]: {k: r[k] for k in ("step", "win_rate", "peak_win_rate", "drop", "kl", "max_kl", "status")}
           for r in rows}
    assert got["new"] == {"step": 20, "win_rate": 0.75, "peak_win_rate": 0.8, "drop": pytest.approx(0.05),
                          "kl": 1.5, "max_kl": 1.5, "status": "completed"}
    assert got["eval-only"] == {"step": 20, "win_rate": 0.75, "peak_win_rate": 0.8, "drop": None, "kl": 1.5,
                                "max_kl": 1.5, "status": None}
    assert got["old"] == {"step": None, "win_rate": 0.75, "peak_win_rate": None, "drop": None, "kl": 1.5,
                          "max_kl": None, "status": None}
    assert rows[0]["loss"] == "dpo" and rows[0]["task"] == "synthetic"
    md = report_wandb.wandb_markdown("me/proj", rows, error)
    assert "| new | finished | completed | align | synthetic | dpo | 0.1 | 0 | 20 | 0.750 | 0.800 | 0.050 | 1.5 | " \
           "1.5 |" in md
    assert "| old | finished | – | align | synthetic | dpo | 0.1 | 0 | – | 0.750 | – | – | 1.5 | – |" in md


def small_sweep(root, experiment="fake"):
    """dpo and isdpo at β 0.1, two seeds each, completed, and one run that crashed at its start."""
    for loss in LOSSES:
        for seed in SEEDS:
            write_run(job(root, loss, 0.1, seed), loss, 0.1, seed)
    write_hydra(job(root, "dpo", 0.1, 2), "dpo", 0.1, 2)
    if experiment != "fake":
        for folder in root.iterdir():
            config = folder / ".hydra" / "config.yaml"
            config.write_text(config.read_text().replace("experiment: fake", f"experiment: {experiment}"))
    return root


def test_the_report_is_logged_into_the_sweeps_wandb_group(tmp_path, monkeypatch):
    """--wandb: the report as an offline W&B run of job_type report in the runs' group (their experiment), its
    PNGs as images and its CSV files as Tables, read back from the .wandb file."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = small_sweep(tmp_path / "multirun" / "fake")
    out = tmp_path / "rep"
    assert report_cli.main([str(root), "--out", str(out), "--wandb"]) == 0
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    run = offline_run(out, path.stem.split("-", 1)[1])
    assert run.run.job_type == "report" and run.run.run_group == "fake"
    (row,) = run.rows_with("tables/stats")
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs and {f"figures/{stem}" for stem in pngs} <= set(row)
    assert all(row[f"figures/{stem}"]["_type"] == "image-file" for stem in pngs)
    for name in report_wandb.REPORT_TABLES:
        with open(out / name, newline="") as f:
            n_rows = len(list(csv.DictReader(f)))
        table = row[f"tables/{name.removesuffix('.csv')}"]
        assert table["_type"] == "table-file" and table["nrows"] == n_rows > 0, name
    assert run.run.config.update  # the sweep and its run counts
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["runs/completed"] == 4 and config["runs/failed"] == 1


def test_the_wandb_group_and_project_of_the_report(tmp_path, monkeypatch, capsys):
    """The group is the runs' experiment, --wandb-group where they name several; the project is --wandb-project
    (ENTITY/PROJECT), else the runs' logger.project; a failed upload leaves the written report and exits 1."""
    root = small_sweep(tmp_path / "a")
    runs = report_runs.load_sweep(root)
    assert report_wandb.report_target(runs) == report_wandb.Target(None, None, "fake")
    assert report_wandb.report_target(runs, "me/proj", "g") == report_wandb.Target("proj", "me", "g")
    for folder in root.iterdir():
        config = folder / ".hydra" / "config.yaml"
        config.write_text(config.read_text() + "logger:\n  name: wandb\n  project: mine\n  entity: team\n")
    assert report_wandb.report_target(report_runs.load_sweep(root)) == report_wandb.Target("mine", "team", "fake")

    shutil.copytree(small_sweep(tmp_path / "b", experiment="other"), root / "b")
    assert report_cli.main([str(root), "--out", str(tmp_path / "rep"), "--wandb", "--no-figures"]) == 2
    assert "several experiments (fake, other)" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()  # refused before anything is written

    def offline_fails(*args, **kwargs):
        raise RuntimeError("no space left for the offline run")

    monkeypatch.setattr(report_wandb, "log_report", offline_fails)
    assert report_cli.main([str(root), "--out", str(tmp_path / "rep"), "--wandb", "--wandb-group", "g",
                            "--no-figures"]) == 1
    assert "could not log it to W&B: RuntimeError: no space left" in capsys.readouterr().err
    assert (tmp_path / "rep" / "report.md").is_file()


def write_pending(folder, loss, beta, seed):
    """Hydra's record of a launch where it waits until the run's checks pass (conf/config.yaml's output_subdir)."""
    write_hydra(folder / "launch", loss, beta, seed)
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / "launch" / ".hydra").rename(folder / artifacts.HYDRA_PENDING)
    (folder / "launch").rmdir()


def test_a_job_stopped_before_its_checks_passed_is_a_failed_run(tmp_path):
    """A job with only .hydra/pending (it stopped before isdpo.run_guard adopted Hydra's record) is listed as a
    failed run, identified from that record; beside a run's own .hydra, a pending record (a refused later launch)
    is not read."""
    root = tmp_path / "sweep"
    write_run(job(root, "dpo", 0.1, 0), "dpo", 0.1, 0)
    stopped = job(root, "isdpo", 0.1, 0)
    write_pending(stopped, "isdpo", 0.1, 0)
    refused = job(root, "dpo", 0.1, 1)
    write_run(refused, "dpo", 0.1, 1)
    write_pending(refused, "isdpo", 0.5, 7)
    bare = job(root, "dpo", 0.1, 2)  # no .hydra of its own (older code): identified from result.json, not pending
    write_run(bare, "dpo", 0.1, 2)
    shutil.rmtree(bare / ".hydra")
    write_pending(bare, "isdpo", 0.5, 7)

    runs = {r.name: r for r in report_runs.load_sweep(root)}
    assert set(runs) == {refused.name, bare.name, job(root, "dpo", 0.1, 0).name, stopped.name}
    assert (runs[bare.name].status, runs[bare.name].loss, runs[bare.name].beta) == ("completed", "dpo", 0.1)
    assert runs[bare.name].config is None and any("not read" in note for note in runs[bare.name].notes)
    run = runs[stopped.name]
    assert (run.status, run.task, run.loss, run.beta, run.seed) == ("failed", "synthetic", "isdpo", 0.1, 0)
    assert "only in .hydra/pending" in run.reason and "config checks" in run.reason
    assert (runs[refused.name].status, runs[refused.name].loss, runs[refused.name].seed) == ("completed", "dpo", 1)
    assert "not passed its config checks" in runs[refused.name].notes[0]
    md = report_build.build_report(root, tmp_path / "rep", figures=False, log=lambda msg: None).read_text()
    failed = md.split("## Incomplete and failed runs")[1]
    assert f"| `{stopped.name}` | isdpo | 0.1 | 0 | failed | Hydra's record only in .hydra/pending" in failed
    assert "3 completed, 0 incomplete, 1 failed" in md

    run_guard.adopt_hydra_record(stopped)  # what the run does once its checks pass: now an ordinary record
    run = {r.name: r for r in report_runs.load_sweep(root)}[stopped.name]
    assert (run.status, run.loss, run.seed) == ("failed", "isdpo", 0) and "no metrics.jsonl" in run.reason


# ----------------------------------------------------------------------------------------------------------
# Runs told apart by their whole config (a sweep over a setting other than loss / beta / seed)
# ----------------------------------------------------------------------------------------------------------

CLIP_KEY = "loss.importance_sampling.log_clip"
CLIPS = ("0.5", "null")


def write_real_run(root, overrides, *, tag, seconds_ago=0.0, record=False):
    """A run folder as Hydra and isdpo.stages write it: the composed, unresolved config (without its hydra node)
    in .hydra/config.yaml, the overrides in .hydra/overrides.yaml, metrics.jsonl and result.json; with ``record``
    also run_config.json as isdpo.run_guard writes it (the resolved config less what it leaves out)."""
    cfg = compose_cfg(overrides, run=False)
    with open_dict(cfg):
        del cfg["hydra"]
    resolved = run_guard.identity(OmegaConf.to_container(cfg, resolve=True)) if record else None
    folder = root / ",".join(sorted(overrides))
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    rows = metrics_rows(cfg.loss.name, cfg.beta, cfg.seed, tag=tag)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"status": "completed", "task": cfg.task.name, "loss": cfg.loss.name, "beta": float(cfg.beta),
              "seed": int(cfg.seed), "run_name": f"{cfg.loss.name}-b{cfg.beta}-s{cfg.seed}",
              "experiment": cfg.experiment, "final": rows[-1], "peak": max(rows, key=lambda r: r["win_rate"]),
              "n_eval_points": len(rows), "train_seconds": 1.0, "reference_dir": "/nowhere",
              "output_dir": str(folder)}
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    if record:
        (folder / "run_config.json").write_text(json.dumps({"hash": "test", "config": resolved}, default=str))
    if seconds_ago:
        then = time.time() - seconds_ago
        os.utime(folder / "result.json", (then, then))
    return folder, result


@pytest.fixture(scope="module")
def clip_sweep(tmp_path_factory):
    """``loss.importance_sampling.log_clip=0.5,null seed=0,1`` with loss=isdpo: two configs, two seeds each."""
    root = tmp_path_factory.mktemp("clip") / "multirun" / "is_clip"
    results = {}
    for clip in CLIPS:
        for seed in SEEDS:
            _, results[(clip, seed)] = write_real_run(root, [f"{CLIP_KEY}={clip}", f"seed={seed}"],
                                                      tag=f"clip{clip}", seconds_ago=100)
    return root, results


def test_runs_differing_in_a_swept_setting_are_not_merged(clip_sweep, tmp_path):
    root, results = clip_sweep
    runs = report_runs.load_sweep(root)
    assert [r.status for r in runs] == ["completed"] * 4  # same loss/beta/seed is not a duplicate: log_clip differs
    rows = report_tables.summarise(runs)
    assert [(r["loss"], r["beta"], r[CLIP_KEY], r["n_seeds"], r["seeds"]) for r in rows] == \
        [("isdpo", 0.1, "0.5", 2, "0 1"), ("isdpo", 0.1, "null", 2, "0 1")]
    for row, clip in zip(rows, CLIPS):
        for col, get in QUANTITIES.items():
            values = [get(results[(clip, seed)]) for seed in SEEDS]
            assert row[f"{col}_mean"] == pytest.approx(float(np.mean(values)), abs=1e-12)
            assert row[f"{col}_std"] == pytest.approx(float(np.std(values, ddof=1)), abs=1e-12)
    # Only the swept setting becomes a column: task.data_seed (${seed}), run_name, paths.* do not.
    assert [k for k in rows[0] if "." in k] == [CLIP_KEY]

    out = tmp_path / "rep"
    md = report_build.build_report(root, out, figures=False, log=lambda msg: None).read_text()
    table = md.split("## Incomplete")[0].replace("**", "")  # bold marks the best final win rate
    assert f"| `{CLIP_KEY}` |" in table and "Columns in `code` are the settings" in table
    for row, clip in zip(rows, CLIPS):
        assert f"| `isdpo` | 0.1 | {clip} | {row['final_win_rate_mean']:.3f} ± {row['final_win_rate_std']:.3f} |" \
            in table
    assert "4 completed, 0 incomplete, 0 failed, 0 duplicate" in md
    with open(out / "summary.csv") as f:
        assert [r[CLIP_KEY] for r in csv.DictReader(f)] == list(CLIPS)
    with open(out / "runs.csv") as f:
        assert sorted(r[CLIP_KEY] for r in csv.DictReader(f)) == ["0.5", "0.5", "null", "null"]

    # Figures: one mean line per configuration, in its own colour, named by the swept setting.
    done = [r for r in runs if r.ok]
    colours = report_plots.series_colours(done)
    fig = report_plots.plot_overoptimization(done, colours, show_seeds=False)
    labels = {f"isdpo, log_clip={clip}" for clip in CLIPS}
    means = {line.get_label(): line for line in fig.axes[0].lines if line.get_label() in labels}
    assert set(means) == labels and len({line.get_color() for line in means.values()}) == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # The over-optimization line is now a mean over √KL bins of all points (it was the per-step seed mean).
    assert [t for t in legend if "binned mean" in t] == [f"isdpo, log_clip={c} (binned mean)" for c in CLIPS]
    report_plots.plt.close(fig)


def test_duplicates_and_runs_without_config_are_said(clip_sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(clip_sweep[0], root)
    # The same config and seed run again elsewhere (newer): counted once, the older one listed as a duplicate.
    rerun, _ = write_real_run(root / "again", [f"{CLIP_KEY}=0.5", "seed=0"], tag="clip0.5-rerun")
    # A run whose .hydra folder is gone: identified by result.json alone, and the report says so.
    bare, _ = write_real_run(root / "bare", [f"{CLIP_KEY}=null", "seed=1"], tag="bare")
    shutil.rmtree(bare / ".hydra")

    runs = {r.name: r for r in report_runs.load_sweep(root)}
    older = runs[f"{CLIP_KEY}=0.5,seed=0"]
    assert older.status == "duplicate" and "again/" in older.reason
    rows = report_tables.summarise(list(runs.values()))
    assert [(r[CLIP_KEY], r["n_seeds"], r["seeds"]) for r in rows] == [("0.5", 2, "0 1"), ("null", 2, "0 1"),
                                                                       ("?", 1, "1")]
    md = report_build.build_report(root, tmp_path / "rep", figures=False, log=lambda msg: None).read_text()
    failed = md.split("## Incomplete and failed runs")[1]
    assert f"`{CLIP_KEY}=0.5,seed=0`" in failed and "duplicate" in failed
    bare_name = bare.relative_to(root)
    assert f"`{bare_name}`: no .hydra/config.yaml" in md and "result.json" in md.split(f"`{bare_name}`:")[1]


def test_loss_sweep_with_real_configs_adds_no_column(tmp_path):
    """loss=dpo,isdpo: the loss's own settings (importance_sampling.enabled ...) follow the loss name, no column."""
    for loss in LOSSES:
        write_real_run(tmp_path, [f"loss={loss}", "seed=0"], tag="")
    rows = report_tables.summarise(report_runs.load_sweep(tmp_path))
    assert [(r["loss"], r["n_seeds"]) for r in rows] == [("dpo", 1), ("isdpo", 1)]
    assert not [k for k in rows[0] if "." in k]


def test_a_setting_derived_from_the_seed_does_not_split_seeds(tmp_path):
    """task.data_seed is ${seed} by default: compared as written, the seeds of that configuration stay one row."""
    for seed in SEEDS:
        write_real_run(tmp_path, [f"seed={seed}"], tag="")
        write_real_run(tmp_path, ["task.data_seed=7", f"seed={seed}"], tag="fixed")
    rows = report_tables.summarise(report_runs.load_sweep(tmp_path))
    assert [(r["task.data_seed"], r["n_seeds"], r["seeds"]) for r in rows] == [("7", 2, "0 1"), ("${seed}", 2, "0 1")]


def test_a_key_added_after_older_runs_reads_as_its_default(tmp_path):
    """A sweep mixing runs of older code (no loss.online in .hydra/config.yaml) with newer runs: the old dpo run
    reads loss.online as its schema default (false), so the dpo seeds stay one row and the key varies only
    because of the online run."""
    old, _ = write_real_run(tmp_path, ["loss=dpo", "seed=0"], tag="")
    cfg = OmegaConf.load(old / ".hydra" / "config.yaml")
    del cfg.loss["online"]
    (old / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert "online" not in OmegaConf.load(old / ".hydra" / "config.yaml").loss
    write_real_run(tmp_path, ["loss=dpo", "seed=1"], tag="")

    runs = report_runs.load_sweep(tmp_path)
    assert report_runs.varying_keys(runs) == []
    assert [(r["loss"], r["n_seeds"], r["seeds"]) for r in report_tables.summarise(runs)] == [("dpo", 2, "0 1")]

    write_real_run(tmp_path, ["loss=online_dpo", "seed=0"], tag="")
    runs = report_runs.load_sweep(tmp_path)
    assert "loss.online" in report_runs.varying_keys(runs)
    assert {(r.loss, r.settings["loss.online"]) for r in runs} == {("dpo", False), ("online_dpo", True)}
    rows = report_tables.summarise(runs)
    assert [(r["loss"], r["n_seeds"], r["seeds"]) for r in rows] == [("dpo", 2, "0 1"), ("online_dpo", 1, "0")]
    assert not [k for k in rows[0] if "." in k]  # loss.online follows the loss name: no column


def test_a_refused_rerun_does_not_relabel_the_run(tmp_path):
    """Hydra rewrites a run folder's .hydra/ before the project refuses a rerun there with another config: the
    report reads the run's own run_config.json, so the completed lr=5e-5 run stays lr=5e-5 (read from .hydra it
    became lr=1e-4 and a duplicate of the real lr=1e-4 run)."""
    old, _ = write_real_run(tmp_path, ["task.train.lr=5e-5", "seed=0"], tag="old", record=True, seconds_ago=100)
    new, _ = write_real_run(tmp_path, ["task.train.lr=1e-4", "seed=0"], tag="new", record=True)
    cfg = OmegaConf.load(old / ".hydra" / "config.yaml")  # the refused rerun of ``old`` with lr=1e-4
    cfg.task.train.lr = 1e-4
    (old / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (old / ".hydra" / "overrides.yaml").write_text("- task.train.lr=1e-4\n- seed=0\n")

    runs = {r.path: r for r in report_runs.load_sweep(tmp_path)}
    assert [r.status for r in runs.values()] == ["completed", "completed"]
    assert runs[old].config["task.train.lr"] == 5e-5 and runs[new].config["task.train.lr"] == 1e-4
    assert "run_config.json" in runs[old].notes[0] and "task.train.lr" in runs[old].notes[0]
    assert runs[new].notes == []  # record and .hydra agree (interpolations such as ${seed} included)
    rows = report_tables.summarise(list(runs.values()))
    assert sorted(r["task.train.lr"] for r in rows) == ["0.0001", "5e-05"]
    assert "task.data_seed" not in rows[0]  # ${seed} as written: the same setting in every run
    # A run without the record (older code) is read from .hydra.
    (new / "run_config.json").unlink()
    assert {r.path: r.config["task.train.lr"] for r in report_runs.load_sweep(tmp_path)}[new] == 1e-4


def test_the_report_reads_the_file_the_run_guard_writes():
    """The report names run_config.json itself (it does not import the training stack): the same name."""
    assert report_runs.RUN_CONFIG == artifacts.RUN_CONFIG
    assert report_runs.HYDRA_PENDING == artifacts.HYDRA_PENDING


def test_golden_reward_beside_the_win_rate(sweep, built):
    """The golden reward (final, and peak of its curve) is in the tables, statistics, claims and figures."""
    rows = {(r["loss"], r["beta"]): r for r in report_tables.summarise(report_runs.load_sweep(sweep))}
    last = len(STEPS) - 1
    assert rows[("dpo", 0.1)]["final_golden_reward_mean"] == pytest.approx(1.0 + last)
    assert rows[("isdpo", 0.1)]["final_golden_reward_mean"] == pytest.approx(1.0 + 1.5 * last)
    assert rows[("isdpo", 0.1)]["peak_golden_reward_mean"] == pytest.approx(1.0 + 1.5 * last)  # rises: last
    md = (built / "report.md").read_text()
    assert "| final golden reward | 95% CI | peak golden reward | 95% CI |" in md
    with open(built / "stats.csv") as f:
        assert {"final_golden_reward", "peak_golden_reward"} <= {r["metric"] for r in csv.DictReader(f)}
    with open(built / "claims.csv") as f:
        golden = [r for r in csv.DictReader(f) if r["metric"] == "final_golden_reward"]
    assert golden and [float(r["mean"]) for r in golden] == pytest.approx([0.5 * last] * len(golden))
    for stem in ("golden_reward_vs_step", "overopt_golden_reward"):
        assert (built / f"{stem}_synthetic.png").stat().st_size > 0 and f"]({stem}_synthetic.png)" in md


def test_drop_is_cross_fitted_on_the_halves_and_the_biased_fallback_is_counted(tmp_path):
    """A run that logged win_rate_a / win_rate_b gets the cross-fitted peak and drop; one without keeps the
    same-sample ones, and report.md says how many."""
    a = [0.50, 0.62, 0.58, 0.70, 0.60]
    b = [0.52, 0.66, 0.64, 0.61, 0.58]
    crossed = write_run(job(tmp_path, "dpo", 0.1, 0), "dpo", 0.1, 0)
    with open(job(tmp_path, "dpo", 0.1, 0) / "metrics.jsonl", "w") as f:
        for row, x, y in zip(crossed, a, b):
            f.write(json.dumps({**row, "win_rate": (x + y) / 2, "win_rate_a": x, "win_rate_b": y}) + "\n")
    write_run(job(tmp_path, "dpo", 0.1, 1), "dpo", 0.1, 1)  # no halves
    runs = {r.seed: r for r in report_runs.load_sweep(tmp_path)}
    values = report_quantities.run_values(runs[0])
    # argmax A = 3 -> B[3] = 0.61; argmax B = 1 -> A[1] = 0.62; finals 0.58 (B) and 0.60 (A)
    assert values["peak_win_rate"] == pytest.approx((0.61 + 0.62) / 2)
    assert values["drop"] == pytest.approx(((0.61 - 0.58) + (0.62 - 0.60)) / 2)
    assert (report_quantities.cross_fitted(runs[0]), report_quantities.cross_fitted(runs[1])) == (True, False)
    result = json.loads((job(tmp_path, "dpo", 0.1, 1) / "result.json").read_text())
    assert report_quantities.run_values(runs[1])["drop"] == pytest.approx(
        result["peak"]["win_rate"] - result["final"]["win_rate"])
    md = report_build.build_report(tmp_path, tmp_path / "rep", figures=False, log=lambda msg: None).read_text()
    assert "**1 of 2 runs have no per-half win rates**" in md
