"""A run folder stays honest: a SIGTERM never passes for success, one process per folder, resume only
what was started with the same config, an unreadable checkpoint says how to recover, SFT keeps its global
batch on every hardware."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from isdpo.artifacts import RUN_CONFIG, config_hash
from isdpo.run_guard import CheckpointUnreadable, ConfigMismatch, EXIT_INTERRUPTED, RunFolderBusy, check_identity, \
    identity, run_folder_lock
from isdpo.stages import run_stage
from isdpo.stages.common import plain
from isdpo.stages.sft import run_sft, sft_micro_batch
from tests.hydra_utils import ROOT, SMALL, compose_cfg

# far more steps than it will run: it is interrupted once it has a checkpoint
LONG = [o for o in SMALL if not o.startswith(("task.train.max_steps", "task.eval.every_n_steps"))] + [
    "stage=align", "task.train.max_steps=5000", "task.train.checkpoint_every_n_steps=2", "task.eval.every_n_steps=50"]


def launch(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "ISDPO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *LONG, *extra, f"hydra.run.dir={out}"],
                            cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, within_s: float = 240) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{path} not written within {within_s} s"
        time.sleep(0.05)


def test_sigterm_exits_143_and_a_second_process_on_the_folder_stops(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.parent.mkdir(parents=True, exist_ok=True)
    first = launch(out, cache)
    wait_for(out / "checkpoints" / "last.ckpt", first)
    second = launch(out, cache)  # the same command while the first runs
    text2 = second.communicate(timeout=240)[0]
    assert second.returncode != 0 and "another process is running in" in text2, text2[-3000:]
    assert first.poll() is None, "the first run ended before it could be interrupted: make it longer"
    first.send_signal(signal.SIGTERM)
    text1 = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_INTERRUPTED, text1[-3000:]
    assert "interrupted at step" in text1 and "rerun the same command to resume" in text1
    assert not (out / "result.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # the second process wrote nothing into the first one's curve


def _small_align(tmp_path, *extra):
    cfg = compose_cfg(SMALL + ["stage=align", "task.train.max_steps=4", "task.train.checkpoint_every_n_steps=2",
                               *extra], tmp_path)
    return cfg


def test_resume_with_another_config_stops_and_names_the_keys(tmp_path):
    done = run_stage(_small_align(tmp_path, "beta=0.1"))
    before = (tmp_path / "run" / "result.json").read_text()
    with pytest.raises(ConfigMismatch) as err:
        run_stage(_small_align(tmp_path, "beta=0.05"))
    msg = str(err.value)
    assert "beta: 0.1 -> 0.05" in msg and "hydra.run.dir" in msg and "task.train.resume=false" in msg
    assert (tmp_path / "run" / "result.json").read_text() == before  # nothing overwritten
    # operational keys may change on resume; the finished run is reused as it is
    again = run_stage(_small_align(tmp_path, "beta=0.1", "task.train.checkpoint_every_n_steps=4"))
    assert again["final"] == done["final"]
    # retraining in place from scratch is allowed when asked for
    fresh = run_stage(_small_align(tmp_path, "beta=0.05", "task.train.resume=false"))
    assert fresh["beta"] == 0.05


def test_a_key_added_after_the_run_reads_as_its_default(tmp_path):
    """A run_config.json written before loss.online existed: resuming with its default is no mismatch (the
    record then gains the key); another value is one, and the message says the key is new."""
    out = tmp_path / "run"
    out.mkdir()
    old = identity(plain(compose_cfg(SMALL + ["stage=align"], tmp_path)))
    del old["loss.online"]
    record = json.dumps({"hash": config_hash(old), "config": old})
    (out / RUN_CONFIG).write_text(record)
    with pytest.raises(ConfigMismatch) as err:
        check_identity(out, plain(compose_cfg(SMALL + ["stage=align", "loss.online=true"], tmp_path)), resuming=True)
    assert "(1 keys differ" in str(err.value)
    assert "loss.online: <absent> (added after that run; its default is False) -> True" in str(err.value)
    assert (out / RUN_CONFIG).read_text() == record  # the record is left as it was

    cfg = plain(compose_cfg(SMALL + ["stage=align"], tmp_path))
    assert check_identity(out, cfg, resuming=True) == config_hash(identity(cfg))
    assert json.loads((out / RUN_CONFIG).read_text())["config"]["loss.online"] is False
    # A key that both configs have and that changed still stops the resume.
    with pytest.raises(ConfigMismatch, match=r"beta: 0\.1 -> 0\.05"):
        check_identity(out, plain(compose_cfg(SMALL + ["stage=align", "beta=0.05"], tmp_path)), resuming=True)


def test_truncated_checkpoint_says_how_to_recover_and_orphans_are_cleaned(tmp_path):
    run_stage(_small_align(tmp_path))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    orphan = ckpt.with_name("last.ckpt.tmp")
    orphan.write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointUnreadable, match=r"truncated or corrupt.*mv .*last\.ckpt"):
        run_stage(_small_align(tmp_path))
    assert not orphan.exists()


def test_run_folder_lock_is_exclusive_and_released(tmp_path):
    with run_folder_lock(tmp_path):
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from isdpo.run_guard import run_folder_lock\n"
             f"with run_folder_lock(Path({str(tmp_path)!r})): pass"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert child.returncode != 0 and "RunFolderBusy" in child.stderr and f"pid {os.getpid()}" in child.stderr
    with run_folder_lock(tmp_path):  # released on exit
        pass


def test_sft_micro_batch_keeps_the_global_batch():
    hw = OmegaConf.create({"devices": 4, "num_nodes": 1, "sft_per_device_batch_size": 8})
    assert sft_micro_batch(64, hw) == (8, 2)  # 8 x 4 devices x 2 accumulation = 64
    hw.sft_per_device_batch_size = None
    assert sft_micro_batch(64, hw) == (16, 1)
    for name in ("cpu", "cpu_ddp2", "gpu1", "h100x4", "h100x8", "h100x8_2nodes"):
        for task in ("synthetic", "tldr"):
            cfg = compose_cfg([f"hardware={name}", f"task={task}"], run=False)
            per, acc = sft_micro_batch(cfg.task.sft.batch_size, cfg.hardware)
            assert per * acc * cfg.hardware.devices * cfg.hardware.num_nodes == cfg.task.sft.batch_size


def test_sft_accumulates_to_the_same_model_and_logs(tmp_path):
    """SFT with micro-batches of 1/4 of the global batch gives the model of one full batch."""
    common = ["task.n_sft_sequences=1280", "task.sft.batch_size=64", "task.sft.epochs=1", "logger=csv"]
    models = {}
    for name, per in (("whole", "null"), ("accumulated", "16")):
        cfg = compose_cfg(common + [f"hardware.sft_per_device_batch_size={per}"], tmp_path / name)
        ref = run_sft(cfg)
        models[name] = load_file(str(ref / "model" / "model.safetensors"))
        logged = (tmp_path / name / "run" / "csv" / "sft" / "metrics.csv").read_text().splitlines()
        assert "train/sft_loss" in logged[0] and len(logged) > 1
    assert models["whole"].keys() == models["accumulated"].keys()
    for k in models["whole"]:
        torch.testing.assert_close(models["accumulated"][k], models["whole"][k], rtol=1e-4, atol=1e-5)
