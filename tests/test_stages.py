"""Every stage under fast_dev_run, the pipeline end to end on a reduced task, the SFT cache, resume."""
import json

import pytest
import torch

from isdpo.config import validate
from isdpo.stages import run_stage
from tests.hydra_utils import SMALL, compose_cfg
from tests.resume_harness import resume_after_crash


@pytest.mark.parametrize("stage", ["sft", "align", "evaluate", "pipeline"])
def test_fast_dev_run_of_every_stage(stage, tmp_path, shared_cache):
    cfg = compose_cfg(SMALL + [f"stage={stage}"], tmp_path, cache_dir=shared_cache)
    validate(cfg)
    out = run_stage(cfg, fast_dev_run=True)
    assert out is not None


FAST_PATH = ["task.train.length_grouped=true", "task.train.packing=true", "task.train.fused_adamw=true"]


def test_align_runs_with_the_fast_path(tmp_path, shared_cache):
    """The stage wiring of length grouping, packing and fused AdamW (that each gives the plain path's
    loss and gradients is checked in tests/test_fast_path.py)."""
    cfg = compose_cfg(SMALL + FAST_PATH + ["stage=align", "task.train.max_steps=3"], tmp_path, cache_dir=shared_cache)
    validate(cfg)
    result = run_stage(cfg)
    assert result["final"]["step"] == 3 and 0.0 <= result["final"]["win_rate"] <= 1.0


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = compose_cfg(SMALL + ["loss=isdpo", "beta=0.1"], tmp)
    validate(cfg)
    return cfg, run_stage(cfg), tmp


def test_pipeline_writes_its_outputs(small_pipeline):
    cfg, result, tmp = small_pipeline
    out = tmp / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    for r in rows:
        assert 0.0 <= r["win_rate"] <= 1.0 and r["kl"] >= 0.0
    saved = json.loads((out / "result.json").read_text())
    assert saved == result
    assert saved["final"] == rows[-1] and saved["peak"]["win_rate"] == max(r["win_rate"] for r in rows)
    assert (saved["loss"], saved["beta"], saved["status"]) == ("isdpo", 0.1, "completed")
    assert (out / "policy" / "config.json").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()  # checkpoint_every_n_steps=100 > 8 steps: saved at the end
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["win_rate"] == pytest.approx(rows[-1]["win_rate"])  # same policy, same seeded samples
    assert len((out / "samples.jsonl").read_text().splitlines()) == cfg.task.eval.n_prompts


def test_sft_reference_is_reused_across_runs(small_pipeline, capsys):
    cfg, _, tmp = small_pipeline
    other = compose_cfg(SMALL + ["loss=dpo", "beta=0.5", "stage=sft"], tmp)
    run_stage(other)
    assert "reused from cache" in capsys.readouterr().out
    assert len(list((tmp / "cache" / "sft").glob("[0-9a-f]*"))) == 1


def test_resume_gives_the_same_numbers_as_no_interruption(tmp_path, monkeypatch, shared_cache):
    """Uninterrupted 8 steps vs. a run killed at step 6 (checkpoint at step 4) and restarted."""
    run = resume_after_crash(SMALL + ["task.train.checkpoint_every_n_steps=4", "task.train.schedule=cosine",
                                      "task.train.warmup_steps=2"], tmp_path, monkeypatch, crash_at_step=6,
                             cache_dir=shared_cache)
    a, b = run.metrics(run.a), run.metrics(run.b)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for key in ("win_rate", "kl", "golden_reward"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    pa, pb = run.checkpoint(run.a), run.checkpoint(run.b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    for key in ("step", "win_rate", "kl"):
        assert run.resumed["final"][key] == pytest.approx(run.expected["final"][key], rel=1e-5, abs=1e-6)


def test_pipeline_evaluates_the_final_policy_once(tmp_path, monkeypatch, shared_cache):
    """stage=pipeline writes align's final evaluation point as evaluation.json/samples.jsonl instead of evaluating
    the same policy again: one evaluator call per curve point, and the files stage=evaluate writes byte for byte."""
    from isdpo.evaluate import Evaluator

    calls = []
    real_call = Evaluator.__call__
    monkeypatch.setattr(Evaluator, "__call__", lambda self, policy: (calls.append(1), real_call(self, policy))[1])
    cfg = compose_cfg(SMALL + ["loss=dpo"], tmp_path, cache_dir=shared_cache)
    result = run_stage(cfg)
    out = tmp_path / "run"
    assert len(calls) == result["n_eval_points"] == 3  # steps 0, 4, 8; none more for stage=evaluate
    saved = {name: (out / name).read_text() for name in ("evaluation.json", "samples.jsonl")}
    assert json.loads(saved["evaluation.json"])["win_rate"] == result["final"]["win_rate"]
    run_stage(compose_cfg(SMALL + ["loss=dpo", "stage=evaluate"], tmp_path, cache_dir=shared_cache))
    assert len(calls) == 4
    assert {name: (out / name).read_text() for name in saved} == saved
    timing = result["timing"]  # where the run's time went (isdpo/timing.py), in result.json too
    assert {"startup", "sft", "preferences", "train", "evaluation", "total"} <= set(timing)
    assert timing["total"]["cpu_s"] == pytest.approx(sum(v["cpu_s"] for k, v in timing.items() if k != "total"),
                                                     abs=0.01)
    assert json.loads((out / "result.json").read_text())["timing"] == timing


def test_resume_from_a_checkpoint_at_an_epoch_end_counts_epochs_right(tmp_path, monkeypatch, shared_cache):
    """A checkpoint written by the last batch of an epoch (step 8 = 256 pairs / 32 per step) resumes in the next
    epoch, as an uninterrupted run goes on: the same points with the same ``epoch`` (it was one too many: the
    loader's saved state pointed past the end of the finished epoch, which Lightning had already counted)."""
    run = resume_after_crash(SMALL + ["task.train.max_steps=12", "task.train.checkpoint_every_n_steps=4"], tmp_path,
                             monkeypatch, crash_at_step=10, cache_dir=shared_cache)
    a, b = run.metrics(run.a), run.metrics(run.b)
    assert [(r["step"], r["epoch"]) for r in a] == [(0, 0), (4, 0), (8, 0), (12, 1)]
    assert [(r["step"], r["epoch"]) for r in b] == [(r["step"], r["epoch"]) for r in a]
    assert [r["win_rate"] for r in b] == [r["win_rate"] for r in a]
