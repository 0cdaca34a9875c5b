"""The README's first hour: a user's mistake (config, data, paths) reads as one message naming the full key,
without a traceback; a GGUF checkpoint says what it needs (the gguf package, model.gguf_file) before transformers
fails on it; a finished run's checkpoints can go (task.train.keep_checkpoints=false), not before its result.json,
and its rerun trains nothing."""
import importlib.util
import os
import subprocess
import sys

import pytest

from isdpo import stages
from isdpo.artifacts import RESULT, WriteFailed, read_json
from isdpo.config import ConfigError, validate
from isdpo.run_guard import ConfigMismatch
from isdpo.stages import run_stage
from isdpo.trainer import accumulation
from tests.hydra_utils import ROOT, SMALL, compose_cfg


def test_a_user_error_is_one_message_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch.py"), "task.train.global_batch_size=33", "logger=none",
           f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("ISDPO_TRACEBACK", "HYDRA_FULL_ERROR")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("[isdpo] error: task.train.global_batch_size=33 is not a multiple of hardware.per_device_batch_size x "
            "hardware.devices x hardware.num_nodes = 64 x 1 x 1 = 64\n"
            "(ISDPO_TRACEBACK=1 shows where it was raised)") in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.strip().splitlines()) <= 6, proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "ISDPO_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("keys,message", [
    ((), r"^task\.train\.global_batch_size=64 is not a multiple of hardware\.per_device_batch_size x "
         r"hardware\.devices x hardware\.num_nodes = 24 x 1 x 1 = 24$"),
    (("task.sft.batch_size", "hardware.sft_per_device_batch_size"),
     r"^task\.sft\.batch_size=64 is not a multiple of hardware\.sft_per_device_batch_size x "),
])
def test_the_batch_error_names_full_keys(keys, message):
    with pytest.raises(ValueError, match=message):
        accumulation(64, 24, 1, 1, *([keys] if keys else []))


def test_a_gguf_model_without_the_gguf_package_says_which_extra_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    cfg = compose_cfg(["model=smollm2_135m"], tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.gguf_file='SmolLM2-135M-Instruct\.Q4_1\.gguf' needs the gguf "
                                          r"package: pip install -e \"\.\[gguf\]\""):
        validate(cfg)


def test_a_folder_holding_a_gguf_file_asks_for_model_gguf_file(tmp_path):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "my-model.Q8_0.gguf").write_bytes(b"GGUF")
    cfg = compose_cfg(["task=preference", "model=tiny_llama_local", f"model.pretrained='{folder}'",
                       "task.data_files.train=x.jsonl"], tmp_path)
    with pytest.raises(ConfigError, match=rf"^model\.pretrained='{folder}': this folder holds a GGUF file: set "
                                          r"model\.gguf_file=my-model\.Q8_0\.gguf$"):
        validate(cfg)
    cfg = compose_cfg(["model=smollm2_135m", f"model.pretrained='{folder}'", "model.gguf_file=other.gguf"], tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.gguf_file='other\.gguf': not found in "):
        validate(cfg)


KEEP_NONE = SMALL + ["stage=align", "task.train.max_steps=2", "task.train.checkpoint_every_n_steps=1",
                     "task.eval.every_n_steps=0", "task.train.keep_checkpoints=false"]


def test_keep_checkpoints_false_deletes_them_once_the_run_has_finished(tmp_path, shared_cache):
    cfg = compose_cfg(KEEP_NONE, tmp_path, cache_dir=shared_cache)
    result = run_stage(cfg)
    out = tmp_path / "run"
    assert result["status"] == "completed" and result["final"]["step"] == 2
    assert not (out / "checkpoints").exists()
    assert (out / "policy" / "config.json").exists() and (out / "result.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoints_outlive_a_crash_before_result_json(tmp_path, shared_cache, monkeypatch):
    """A run that stops between its last step and result.json resumes at its end: nothing trains again."""
    def full_disk(path, *args, **kwargs):
        raise WriteFailed(f"{path}: no space left on device (ENOSPC)")

    cfg = compose_cfg(KEEP_NONE, tmp_path, cache_dir=shared_cache)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(stages, "write_json", full_disk)
        with pytest.raises(WriteFailed):
            run_stage(cfg)
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / RESULT).exists()
    curve = (out / "metrics.jsonl").read_text()
    result = run_stage(compose_cfg(KEEP_NONE, tmp_path, cache_dir=shared_cache))
    assert result["final"]["step"] == 2 and (out / RESULT).exists() and not (out / "checkpoints").exists()
    assert (out / "metrics.jsonl").read_text() == curve  # resumed at its end: no step trained, no point added


def test_a_finished_run_without_checkpoints_is_not_trained_again(tmp_path, shared_cache, capsys):
    cfg = compose_cfg(KEEP_NONE, tmp_path, cache_dir=shared_cache)
    run_stage(cfg)
    out = tmp_path / "run"
    weights = out / "policy" / "model.safetensors"
    before = (read_json(out / RESULT), weights.stat().st_mtime_ns, (out / "metrics.jsonl").read_text())
    capsys.readouterr()
    again = run_stage(compose_cfg(KEEP_NONE, tmp_path, cache_dir=shared_cache))
    assert "nothing to train. To train it again in place: task.train.resume=false" in capsys.readouterr().out
    assert again == before[0]
    assert (read_json(out / RESULT), weights.stat().st_mtime_ns, (out / "metrics.jsonl").read_text()) == before
    # another config in the folder is still refused, not passed off as finished
    with pytest.raises(ConfigMismatch):
        run_stage(compose_cfg(KEEP_NONE + ["task.train.lr=1e-4"], tmp_path, cache_dir=shared_cache))
    # resume=false trains it again in place
    retrained = run_stage(compose_cfg(KEEP_NONE + ["task.train.resume=false"], tmp_path, cache_dir=shared_cache))
    assert retrained["final"]["step"] == 2 and weights.stat().st_mtime_ns != before[1]