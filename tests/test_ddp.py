"""Data parallelism: 2 CPU processes (DDP over gloo) train to the same policy as 1 process with the
same global batch, since each rank sees its half of the same seeded global batch and DDP averages."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.hydra_utils import ROOT

COMMON = [
    "stage=align", "logger=none", "task.n_sft_sequences=256", "task.sft.epochs=1", "task.sft.batch_size=64",
    "task.n_pref_prompts=256", "task.train.max_steps=3", "task.eval.every_n_steps=0", "task.eval.n_prompts=16",
    "task.train.global_batch_size=32", "task.train.checkpoint_every_n_steps=0", "loss=isdpo",
]


def run(tmp_path, name, overrides):
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *COMMON, *overrides, f"hydra.run.dir={tmp_path / name}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(tmp_path / name / "policy" / "model.safetensors"))



def test_two_process_ddp_matches_one_process(tmp_path):
    single = run(tmp_path, "single", ["hardware=cpu", "hardware.per_device_batch_size=32"])
    ddp = run(tmp_path, "ddp", ["hardware=cpu_ddp2", "hardware.per_device_batch_size=16"])
    assert single.keys() == ddp.keys()
    moved = 0
    for key in single:
        diff = (single[key] - ddp[key]).abs().max().item()
        assert diff < 2e-5, (key, diff)
    sft = load_file(str(next((tmp_path / "cache" / "sft").glob("[0-9a-f]*")) / "model" / "model.safetensors"))
    moved = sum(int(not (sft[k] == single[k]).all()) for k in single)
    assert moved > 0  # training did change the policy, so equality above is not vacuous
