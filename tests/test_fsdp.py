"""FSDP (FULL_SHARD) over 2 CPU processes (``hardware=cpu_fsdp2``, gloo; isdpo.trainer.SharedReferenceFSDP):
sharded SFT and align train to the same policy as one process, ``policy/`` is a plain Hugging Face folder
holding the trained weights, a run resumed from a sharded run's checkpoint ends where the uninterrupted run
ends, rank zero evaluates with the whole policy and reference, and ``perf/*`` counts the whole model's FLOPs.

Each rank holds only a shard of every parameter outside FSDP's forward, so anything that reads the model
directly (``save_pretrained``, evaluation, the FLOP count) must first gather it; these runs check each.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from isdpo.flops import matmul_params
from tests.hydra_utils import ROOT

STEPS = 12  # > 10: PerfMonitor logs one window (steps 2..11; the first batch is set-up)
COMMON = [
    "stage=align", "logger=csv", "task.n_sft_sequences=256", "task.sft.epochs=1", "task.sft.batch_size=64",
    "task.n_pref_prompts=256", "task.eval.every_n_steps=6", "task.eval.n_prompts=16",
    "task.train.global_batch_size=32", "task.train.checkpoint_every_n_steps=6", "loss=isdpo",
    "hardware.peak_flops=1.0e12",  # any number: MFU and TFLOP/s are then logged on the CPU too
]
FSDP = ["hardware=cpu_fsdp2", "hardware.per_device_batch_size=16"]
TIMEOUT_S = 300


def launch(tmp_path: Path, name: str, overrides: list[str], steps: int = STEPS) -> Path:
    out = tmp_path / name
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *COMMON, f"task.train.max_steps={steps}", *overrides,
           f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        pytest.fail(f"{name}: no exit within {TIMEOUT_S} s (a rank waiting in a collective?):\n{log[-4000:]}")
    assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
    (out / "launch.log").write_text(log)
    return out


def policy(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "policy" / "model.safetensors"))


def last_row(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def perf_row(out: Path) -> dict:
    with open(out / "csv" / "align" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("perf/tokens_per_s")]
    assert rows, "no perf/* row logged"
    return {k: float(v) for k, v in rows[-1].items() if v}


@pytest.mark.ddp
def test_fsdp_two_cpu_ranks_train_save_resume_and_evaluate(tmp_path):
    full = launch(tmp_path, "full", FSDP)  # on an empty cache: the SFT reference trains sharded too
    sft_dir = next(p for p in (tmp_path / "cache" / "sft").iterdir() if not p.name.startswith("."))
    sft = AutoModelForCausalLM.from_pretrained(sft_dir / "model")  # whole tensors (a shard would not load)

    # policy/ is a plain HF folder with the trained weights: those of the final checkpoint, moved from the SFT's
    trained = policy(full)
    ckpt = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    want = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert want.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(trained[k], want[k], rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(full / "policy")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    moved = sum(int(not torch.equal(v, trained[k])) for k, v in sft.state_dict().items())
    assert moved > 0

    # the same training in one process (global batch 32 either way)
    single = policy(launch(tmp_path, "single", ["hardware=cpu", "hardware.per_device_batch_size=32"]))
    for k in trained:
        diff = (trained[k] - single[k]).abs().max().item()
        assert diff < 1e-4, (k, diff)

    # the checkpoint holds whole tensors: the policy's and Adam's state of every parameter
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(want)
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == sorted(tuple(v.shape) for v in want.values())

    # resume: continue a run's checkpoint (its final one, at step 6) to step 12, sharded and in one process:
    # the same numbers (a lost optimizer state or a shard loaded into the wrong place would differ). The
    # final checkpoint ends its epoch, so the continuation is not the 12-step run's: one process is the yardstick.
    def resumed(name: str, hardware: list[str]) -> Path:
        half = launch(tmp_path, f"{name}-half", hardware, steps=6)
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copy(half / "checkpoints" / "last.ckpt", tmp_path / name / "checkpoints" / "last.ckpt")
        out = launch(tmp_path, name, hardware)
        assert "resuming from" in (out / "launch.log").read_text()
        return out

    sharded, plain = resumed("resumed", FSDP), resumed("resumed1", ["hardware=cpu", "hardware.per_device_batch_size=32"])
    again, again1 = policy(sharded), policy(plain)
    for k in trained:
        diff = (again[k] - again1[k]).abs().max().item()
        assert diff < 1e-4, (k, diff)
    # Resumed at step 6 in a folder that holds only the copied checkpoint: the earlier points (step 0) are not
    # evaluated again; the checkpoint's own point, lost with the curve, is (EvalCallback.on_train_start).
    for out in (sharded, plain):
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [6, STEPS]

    # rank zero evaluated the whole policy: the same curve point at the end, and step 0 has KL 0 (policy = ref)
    a, b = last_row(sharded), last_row(plain)
    assert a["step"] == b["step"] == STEPS
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-2) and a["kl"] > 0
    first = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["kl"] == pytest.approx(0.0, abs=1e-5)

    # perf/*: FLOPs per token of the whole model (6N, +2N with the reference online), not of a rank's shard
    n = matmul_params(loaded)
    perf = perf_row(full)
    per_token = perf["perf/tflops_per_device"] * 1e12 / (perf["perf/tokens_per_s"] / 2)  # 2 ranks
    assert min(abs(per_token / (6 * n) - 1), abs(per_token / (8 * n) - 1)) < 1e-6, (per_token, n)
    assert perf["perf/mfu"] == pytest.approx(perf["perf/tflops_per_device"], rel=1e-6)  # peak = 1 TFLOP/s
