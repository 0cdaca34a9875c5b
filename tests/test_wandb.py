"""W&B: offline without a key, deterministic run id (a rerun continues the same run), grouping and tags,
and wandb.finish() even when the job fails."""
import pytest
import wandb

from isdpo.stages import run_stage
from tests.hydra_utils import SMALL, compose_cfg

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

    monkeypatch.setattr(stages, "write_result", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(cfg)
    assert wandb.run is None
