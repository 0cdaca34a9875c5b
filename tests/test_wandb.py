"""W&B: offline without a key, deterministic run id (a rerun continues the same run), grouping and tags,
wandb.finish() even when the job fails; the comparison surface (isdpo.tracking): metric definitions on the
global step, eval/sqrt_kl at every point, the run's summary (at the end, on a resume, on a failure), the curve
table, and a report uploaded as a run of job_type "report". Read back from the offline .wandb files."""
import json
import math

import pytest
import wandb
from PIL import Image

from isdpo.stages import run_stage
from isdpo.tracking import log_report, run_summary, typed_columns
from tests.hydra_utils import SMALL, compose_cfg
from tests.wandb_records import OfflineRun, offline_run

TINY = [o for o in SMALL if not o.startswith("logger")] + ["logger=wandb", "task.train.max_steps=2",
                                                           "task.eval.every_n_steps=0", "stage=align"]


def offline_runs(run_dir):
    return sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))


def offline_ids(run_dir) -> set[str]:
    """The run ids, from each offline folder's ``run-<id>.wandb`` (folder names of two runs started in the
    same second get a ``-1`` suffix)."""
    return {f.stem.split("-", 1)[1] for f in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}


def test_offline_run_with_deterministic_id_group_and_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    cfg = compose_cfg(TINY + ["loss=dpo", "beta=0.05", "experiment=wb"], tmp_path)
    run_stage(cfg)
    assert wandb.run is None  # finished
    first = offline_ids(tmp_path / "run")
    # one W&B run per stage, with a job_type suffix: the SFT reference (built on this cold cache) and align
    assert len(first) == 2 and {i.rsplit("-", 1)[1] for i in first} == {"sft", "align"}, first
    (run_id,) = [i for i in first if i.endswith("-align")]
    run_stage(cfg)  # same overrides -> same folder -> same W&B id; the SFT reference now comes from the cache
    assert offline_ids(tmp_path / "run") == first and len(offline_runs(tmp_path / "run")) == 3
    record = next((tmp_path / "run" / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")).read_bytes()
    for needle in (b"loss.name", b"wb", b"loss:dpo", b"beta:0.05", b"task:synthetic", b"dpo-b0.05-s0"):
        assert needle in record, needle  # flat config, group, tags and run name are in the run record


def test_wandb_finish_runs_when_a_job_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(TINY, tmp_path)
    import isdpo.stages.align as stages

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(stages, "save_model", boom)  # after training: the curve is complete
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(cfg)
    assert wandb.run is None
    (run_id,) = [i for i in offline_ids(tmp_path / "run") if i.endswith("-align")]
    summary = offline_run(tmp_path / "run", run_id).summary
    assert summary["status"] == "failed" and summary["n_eval_points"] == 2  # the curve it had: steps 0 and 2
    assert summary["final/step"] == 2 and "final/win_rate" in summary


def test_summary_metric_definitions_sqrt_kl_and_curve_table_at_the_end_and_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(TINY + ["task.train.max_steps=3", "task.eval.every_n_steps=1", "logger.log_every_n_steps=2"],
                      tmp_path)
    run_stage(cfg)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "sqrt_kl" not in rows[0]  # the file keeps what it had
    (run_id,) = [i for i in offline_ids(out) if i.endswith("-align")]
    run = offline_run(out, run_id)
    assert run.run.job_type == "align" and run.run.run_group == "default"
    # every family on the global step; the summaries that mean something
    for family in ("train/*", "eval/*", "perf/*"):
        assert run.metrics[family].step_metric == "trainer/global_step", family
    assert run.metrics["eval/win_rate"].summary.max and run.metrics["eval/win_rate"].summary.last
    assert run.metrics["eval/kl"].summary.max and run.metrics["eval/loss"].summary.min
    # training metrics every logger.log_every_n_steps=2 optimizer steps: the second (global step 1 while it runs)
    assert [r["trainer/global_step"] for r in run.rows_with("train/loss")] == [1]
    # eval/sqrt_kl at every evaluation point, beside eval/kl and the step
    points = run.rows_with("eval/win_rate")
    assert [p["trainer/global_step"] for p in points] == [0, 1, 2, 3]
    for p, r in zip(points, rows):
        assert p["eval/kl"] == pytest.approx(r["kl"]) and p["eval/sqrt_kl"] == pytest.approx(math.sqrt(r["kl"]))
    summary = run.summary
    peak = max(rows, key=lambda r: r["win_rate"])
    assert summary["status"] == "completed" and summary["n_eval_points"] == 4 and summary["peak_by"] == "win_rate"
    assert summary["final/win_rate"] == rows[-1]["win_rate"] and summary["final/step"] == 3
    assert summary["peak/win_rate"] == peak["win_rate"] and summary["peak/step"] == peak["step"]
    assert summary["drop/win_rate"] == pytest.approx(peak["win_rate"] - rows[-1]["win_rate"])
    assert summary["final/kl"] == rows[-1]["kl"] and summary["max/kl"] == max(r["kl"] for r in rows)
    assert summary["final/golden_reward"] == rows[-1]["golden_reward"]
    assert summary["peak/golden_reward"] == peak["golden_reward"]
    assert summary["eval/win_rate"] == {"max": max(r["win_rate"] for r in rows), "last": rows[-1]["win_rate"]}
    # the curve as a table: one row per point, sqrt_kl after kl
    assert summary["curve"]["_type"] == "table-file" and summary["curve"]["nrows"] == 4
    (table,) = list(run_dir_of(out, run_id).glob("files/media/table/curve_*.table.json"))
    table = json.loads(table.read_text())
    columns = table["columns"]
    assert columns.index("sqrt_kl") == columns.index("kl") + 1
    assert [dict(zip(columns, d))["win_rate"] for d in table["data"]] == [r["win_rate"] for r in rows]
    # a rerun resumes at the end and sets the same summary again, in the same W&B run
    run_stage(cfg)
    again = offline_run(out, run_id)
    assert again.records is not run.records and again.summary["status"] == "completed"
    for key in ("final/win_rate", "peak/win_rate", "peak/step", "drop/win_rate", "max/kl"):
        assert again.summary[key] == summary[key], key


def run_dir_of(out, run_id):
    return max((out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"), key=lambda p: p.stat().st_mtime).parent


def test_run_summary_of_a_curve_without_a_golden_reward():
    rows = [{"step": 0, "loss": 0.69, "rewards/accuracies": 0.5}, {"step": 4, "loss": 0.5, "rewards/accuracies": 0.75},
            {"step": 8, "loss": 0.6, "rewards/accuracies": 0.625}]
    summary = run_summary("completed", rows, rows[1], "rewards/accuracies")
    assert summary == {"status": "completed", "n_eval_points": 3, "final/step": 8, "final/loss": 0.6,
                       "final/rewards/accuracies": 0.625, "peak/step": 4, "peak/loss": 0.5,
                       "peak/rewards/accuracies": 0.75, "drop/rewards/accuracies": 0.125,
                       "peak_by": "rewards/accuracies"}
    assert run_summary("failed", [], None, None) == {"status": "failed", "n_eval_points": 0}


def test_a_report_is_logged_as_a_run_of_job_type_report(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    Image.new("RGB", (8, 6), "white").save(tmp_path / "overopt.png")
    (tmp_path / "overopt.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "stats.csv").write_text('loss,beta,final win rate\ndpo,0.01,"0.84 [0.83, 0.85]"\nisdpo,0.01,0.98\n')
    run_id = log_report(tmp_path, [tmp_path / "overopt.png", tmp_path / "overopt.svg"], [tmp_path / "stats.csv"],
                        group="testbed", config={"sweep": "synthetic_testbed"})
    assert wandb.run is None
    run = offline_run(tmp_path, run_id)
    assert run.run.job_type == "report" and run.run.run_group == "testbed" and run.run.display_name == "report-testbed"
    (row,) = run.rows_with("figures/overopt")
    assert row["figures/overopt"]["_type"] == "image-file" and row["figures/overopt"]["width"] == 8
    assert row["tables/stats"]["_type"] == "table-file" and row["tables/stats"]["nrows"] == 2
    files = run_dir_of(tmp_path, run_id) / "files"
    assert (files / "overopt.svg").exists()
    (table,) = list(files.glob("media/table/tables/stats_*.table.json"))
    table = json.loads(table.read_text())
    assert table["columns"] == ["loss", "beta", "final win rate"]
    assert table["data"] == [["dpo", 0.01, "0.84 [0.83, 0.85]"], ["isdpo", 0.01, "0.98"]]
    assert log_report(tmp_path, group="testbed") == run_id  # the same report folder: the same run


def test_csv_columns_are_numbers_only_when_every_cell_is_one():
    assert typed_columns([["a", "1", "", "2"], ["b", "x", "3"]]) == [["a", "1", None, 2.0], ["b", "x", 3.0, None]]
    assert typed_columns([["a", "1", "2"]], width=2) == [["a", 1.0]]  # as wide as the header
