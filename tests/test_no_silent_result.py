"""No silent wrong result: a run that trained nothing or lacks its final evaluation never reports success; a batch
the data cannot fill is refused with the numbers; outputs are whole or absent and a failed write names the file and
the cause; corrupt files (JSON records, cache entries, checkpoints) are found; a live cache builder is never robbed;
a refused rerun leaves the run's Hydra record alone; a log gets a line per tenth of the run, not a redrawn bar."""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

import isdpo.stages.align as align
from isdpo.artifacts import (BUILDER, CHECKPOINT, METRICS, ORPHAN_ENV, POLICY, RESULT, RUN_CONFIG, RUN_LOCK,
                             CorruptFile, WriteFailed, cached_dir, clean_orphans, process_start)
from isdpo.callbacks import EvalCallback
from isdpo.data.loader import BatchMismatch, ResumableLoader
from isdpo.module import PreferenceModule
from isdpo.run_guard import CheckpointUnreadable, RunIncomplete
from isdpo.stages import run_stage
from isdpo.stages.sft import run_sft
from tests.hydra_utils import ROOT, SMALL, compose_cfg

# 256 pairs at 32 a step: 8 steps an epoch; 4 steps, a point every 2, a checkpoint every 2
ALIGN = [o for o in SMALL if not o.startswith(("task.train.max_steps", "task.eval.every_n_steps"))] + [
    "stage=align", "task.train.max_steps=4", "task.eval.every_n_steps=2", "task.train.checkpoint_every_n_steps=2"]


def align_cfg(tmp_path: Path, *extra: str):
    return compose_cfg(ALIGN + list(extra), tmp_path)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


# -- a run that trained nothing, or whose batch the data cannot fill -----------------------------------------------


def test_a_global_batch_larger_than_the_pairs_is_refused_before_training(tmp_path):
    with pytest.raises(BatchMismatch, match=r"256 training pairs are fewer than task.train.global_batch_size=512: "
                                            r"not one step of 512 fits"):
        run_stage(align_cfg(tmp_path, "hardware.per_device_batch_size=512", "task.train.global_batch_size=512"))
    assert not (tmp_path / "run" / RESULT).exists() and not (tmp_path / "run" / POLICY).exists()


def test_a_run_without_its_steps_or_its_final_evaluation_never_reports_completed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(align, "fit", lambda *a, **k: None)  # training that returns without a step
        with pytest.raises(RunIncomplete, match=r"ended at optimizer step 0 of 4 .* nothing was trained"):
            run_stage(align_cfg(tmp_path))
    assert not (out / RESULT).exists() and not (out / POLICY).exists()

    with monkeypatch.context() as m:
        m.setattr(EvalCallback, "on_train_end", lambda *a: None)  # the final point is lost
        with pytest.raises(RunIncomplete, match=r"metrics.jsonl has no evaluation at the last step, 4 \(its last "
                                                r"point: step 3\).*Rerun the same command"):
            run_stage(align_cfg(tmp_path, "task.eval.every_n_steps=3"))
    assert not (out / RESULT).exists() and not (out / POLICY).exists()
    result = run_stage(align_cfg(tmp_path, "task.eval.every_n_steps=3"))  # resumes at its end, evaluates step 4
    assert [r["step"] for r in rows(out)] == [0, 3, 4] and result["final"]["step"] == 4
    assert json.loads((out / RESULT).read_text())["status"] == "completed"


def test_a_global_batch_that_does_not_divide_the_pairs_is_refused_or_skips_the_remainder(tmp_path, monkeypatch):
    with pytest.raises(BatchMismatch) as err:
        run_stage(align_cfg(tmp_path, "task.train.global_batch_size=96", "task.train.max_steps=3"))
    assert ("256 training pairs are not a multiple of task.train.global_batch_size=96: each epoch is 2 step(s) of 96 "
            "and 64 left over" in str(err.value))
    assert "(e.g. 64 or 128)" in str(err.value) and "task.train.drop_remainder=true" in str(err.value)

    micro = []
    step = PreferenceModule.training_step
    monkeypatch.setattr(PreferenceModule, "training_step", lambda self, b, i: (micro.append(i), step(self, b, i))[1])
    result = run_stage(align_cfg(tmp_path, "task.train.global_batch_size=96", "task.train.max_steps=3",
                                 "task.train.drop_remainder=true"))
    # 3 steps of 6 micro-batches of 16 (was 6 + 6 + 4: the epoch's last 64 pairs as a step of their own)
    assert len(micro) == 18 and result["final"]["step"] == 3


def test_an_epoch_holds_whole_optimizer_steps_only():
    loader = ResumableLoader(list(range(100)), batch_size=4, seed=0, accumulate=3)  # 25 batches: 8 steps of 3
    assert len(loader) == 24 and len(list(loader)) == 24
    loader.load_state_dict({"epoch": 0, "consumed": 20})
    assert len(list(loader)) == 4
    loader.load_state_dict({"epoch": 0, "consumed": 24})  # saved by the epoch's last whole step: the next epoch
    assert loader.state_dict() == {"epoch": 1, "consumed": 0}


# -- files of a run folder: torn, corrupt, half-written -----------------------------------------------------------


def test_a_torn_last_line_of_the_curve_is_dropped_on_resume_and_the_lock_file_removed(tmp_path, capsys):
    out = tmp_path / "run"
    done = run_stage(align_cfg(tmp_path))
    assert not (out / RUN_LOCK).exists()  # a folder with a lock file has a live run
    before = rows(out)
    # a crash while writing the last point: the checkpoint's own point is lost
    lines = (out / METRICS).read_text().splitlines()
    (out / METRICS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    capsys.readouterr()
    again = run_stage(align_cfg(tmp_path))
    assert f"{out / METRICS}:{len(lines)}: dropped a half-written last line" in capsys.readouterr().out
    # the lost point is evaluated again: the same numbers (its epoch is the resumed trainer's)
    assert [{**r, "epoch": None} for r in rows(out)] == [{**r, "epoch": None} for r in before]
    assert {**again["final"], "epoch": None} == {**done["final"], "epoch": None}


def test_corrupt_records_and_checkpoints_are_named_with_what_to_do(tmp_path):
    out = tmp_path / "run"
    run_stage(align_cfg(tmp_path))
    record, curve, ckpt = out / RUN_CONFIG, out / METRICS, out / CHECKPOINT

    good = record.read_bytes()
    record.write_bytes(good[:100])
    with pytest.raises(CorruptFile, match=r"run_config.json is not valid JSON .* truncated or corrupt.*"
                                          r"task.train.resume=false.*mv "):
        run_stage(align_cfg(tmp_path))
    record.write_bytes(good)

    good = curve.read_text()
    lines = good.splitlines()
    curve.write_text("\n".join([lines[0][:-1], *lines[1:]]) + "\n")  # the first line lost its closing brace
    with pytest.raises(CorruptFile, match=r"metrics.jsonl:1: not valid JSON .* Move it away"):
        run_stage(align_cfg(tmp_path))
    curve.write_text(good)

    # 8 KiB zeroed inside the checkpoint: the same size, a readable zip directory; its CRCs catch it
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8192] = bytes(8192)
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointUnreadable, match=r"fails its CRC check\): it is truncated or corrupt. Move it away "
                                                   r".*\(mv .*last.ckpt .*last.ckpt.bad\)"):
        run_stage(align_cfg(tmp_path))


def test_a_failed_policy_write_leaves_no_policy_and_names_it_with_the_cause(tmp_path, monkeypatch):
    """A file size limit (ulimit -f) hit while writing policy/: safetensors' own error names no file."""
    out = tmp_path / "run"
    save = align.save_model

    def limited(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # under the model's size
        try:
            save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(align, "save_model", limited)
    with pytest.raises(WriteFailed, match=re.escape(f"cannot write {out / POLICY}: a file size limit was reached")):
        run_stage(align_cfg(tmp_path, "task.train.checkpoint_every_n_steps=0"))
    assert not (out / POLICY).exists() and not list(out.glob(".policy*")) and not (out / RESULT).exists()


def test_a_read_only_folder_mid_run_names_the_checkpoint_not_the_loggers_file(tmp_path, monkeypatch):
    """A read-only file system (simulated: the tests run as root, who may write anywhere) fails the checkpoint;
    the CSV logger then fails to flush as the run stops: the last error must still be the checkpoint's."""
    read_only = []  # the file system turns read-only at the first checkpoint write

    def checkpoint(*args, **kwargs):
        read_only.append(True)
        raise OSError(errno.EROFS, "Read-only file system")

    def csv_save(self, save=CSVLogger.save):
        if read_only:
            raise OSError(errno.EROFS, "Read-only file system")
        save(self)

    run_sft(align_cfg(tmp_path, "logger=csv"))  # the cached reference
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", checkpoint)
    monkeypatch.setattr(CSVLogger, "save", csv_save)
    with pytest.raises(WriteFailed) as err:
        run_stage(align_cfg(tmp_path, "logger=csv"))
    assert str(err.value).startswith(f"cannot write {tmp_path / 'run' / CHECKPOINT}: the file system is read-only")


# -- the store: content hashes, live builders ---------------------------------------------------------------------


def test_a_cache_entry_with_zeroed_bytes_is_rebuilt_not_reused(tmp_path, capsys):
    cfg = align_cfg(tmp_path)
    entry = run_sft(cfg)
    weights = entry / "model" / "model.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[len(data) // 2:len(data) // 2 + 8192] = bytes(8192)  # the same size: a size check sees nothing
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_sft(cfg) == entry
    said = capsys.readouterr().out
    assert "model/model.safetensors is corrupt: its bytes changed since it was written (sha256 differs)" in said
    assert "SFT reference trained" in said and weights.read_bytes() == good  # rebuilt, the same bytes
    os.utime(weights)  # touched, not changed: hashed again, reused
    run_sft(cfg)
    assert "SFT reference reused from cache" in capsys.readouterr().out


def test_a_live_builder_is_never_robbed_and_a_robbed_one_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ORPHAN_ENV, "1")
    final = tmp_path / "kind" / "entry"
    tmp = final.parent / f".tmp-{final.name}-live"
    tmp.mkdir(parents=True)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        os.kill(builder.pid, signal.SIGSTOP)  # stopped: its heartbeat thread too
        record = {"host": socket.gethostname(), "pid": builder.pid, "start": process_start(builder.pid)}
        (tmp / BUILDER).write_text(json.dumps(record))
        os.utime(tmp / BUILDER, (1, 1))  # its last heartbeat: long ago
        assert clean_orphans(final) == [] and tmp.is_dir()
        (tmp / BUILDER).write_text(json.dumps({**record, "start": "another boot:1"}))  # the pid, reused
        os.utime(tmp / BUILDER, (1, 1))
        assert clean_orphans(final) == [tmp] and not tmp.exists()
    finally:
        builder.kill()
        builder.wait()

    def robbed(folder: Path) -> None:  # another job removes the folder; a save then makes it again
        for f in folder.iterdir():
            f.unlink()
        (folder / "weights.bin").write_bytes(b"half")

    with pytest.raises(RuntimeError, match=r"was removed while this process built in it .* nothing is published"):
        cached_dir(tmp_path, "kind", {"k": 1}, robbed)
    assert [p.name for p in (tmp_path / "kind").iterdir() if not p.name.startswith(".")] == []  # no entry


# -- what a launch shows: a refused rerun, the exit status, the log ------------------------------------------------


def launch(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ISDPO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *ALIGN, *extra, f"hydra.run.dir={out}"],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)


def test_a_refused_rerun_keeps_the_runs_hydra_record_and_no_failure_exits_0(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.parent.mkdir(parents=True, exist_ok=True)
    first = launch(out, cache, "task.train.lr=5e-5", "task.eval.every_n_steps=0")
    assert first.returncode == 0, first.stderr[-3000:]
    steps = [ln for ln in first.stdout.splitlines() if re.match(r"\[isdpo\] step \d+/4 ", ln)]
    assert len(steps) == 4 and "\r" not in first.stdout, first.stdout[-2000:]  # a line per tenth of 4 steps, no bar
    assert not (out / "launch.log").exists() and not (out / RUN_LOCK).exists()
    second = launch(out, cache, "task.train.lr=1e-4", "task.eval.every_n_steps=0")
    said = second.stdout + second.stderr
    assert second.returncode != 0 and "task.train.lr: 5e-05 -> 0.0001" in said, said[-3000:]
    assert yaml.safe_load((out / ".hydra" / "config.yaml").read_text())["task"]["train"]["lr"] == 5e-5
    assert "task.train.lr=5e-5" in (out / ".hydra" / "overrides.yaml").read_text()
    # the command: a global batch larger than the pairs; nothing trains, the exit status says so
    zero = launch(tmp_path / "zero", cache, "hardware.per_device_batch_size=512", "task.train.global_batch_size=512")
    assert zero.returncode != 0 and not (tmp_path / "zero" / RESULT).exists()
    said = zero.stdout + zero.stderr
    assert "256 training pairs are fewer than task.train.global_batch_size=512" in said, said[-2000:]
