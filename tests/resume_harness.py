"""A run stopped by an exception at a training step and started again, beside the same run uninterrupted: what the
resume tests compare (their numbers, their checkpoints)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from isdpo.stages import align, run_stage
from tests.hydra_utils import compose_cfg


class Crash(Exception):
    """Raised at the chosen step, as a killed process would stop there."""


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash()


@dataclass
class ResumedRun:
    """The uninterrupted run (``a``) and the resumed one (``b``): their results and run folders."""

    expected: dict
    resumed: dict
    a: Path
    b: Path

    def metrics(self, run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def checkpoint(self, run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def resume_after_crash(overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                       crash_at_step: int, cache_dir: Path | None = None) -> ResumedRun:
    """Run ``overrides`` uninterrupted, then again stopped at ``crash_at_step`` (a checkpoint must exist by then)
    and started again with the same config; both share one cache (``cache_dir``, else ``tmp_path/cache``)."""
    cache = cache_dir or tmp_path / "cache"
    expected = run_stage(compose_cfg(overrides, tmp_path / "a", cache_dir=cache))
    cfg = compose_cfg(overrides, tmp_path / "b", cache_dir=cache)
    real_build = align.build_trainer
    with monkeypatch.context() as patch:
        patch.setattr(align, "build_trainer",
                      lambda *a, **k: real_build(*a, **{**k, "callbacks": k["callbacks"] + [CrashAt(crash_at_step)]}))
        with pytest.raises(Crash):
            run_stage(cfg)
    assert (tmp_path / "b" / "run" / "checkpoints" / "last.ckpt").exists(), "no checkpoint to resume from"
    resumed = run_stage(cfg)
    return ResumedRun(expected, resumed, tmp_path / "a" / "run", tmp_path / "b" / "run")
