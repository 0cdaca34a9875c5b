"""The GPU paths (``pytest -m gpu``; skipped without CUDA; bench/gpu_check.sh runs them on a lent GPU):
bf16-mixed align on one GPU with a plausible ``perf/mfu``, FSDP (with activation checkpointing) on one GPU
with its checkpoint, resume and ``policy/``, evaluation sampling and the golden RM placed on the GPU, and the
text pipeline on the local stand-ins under ``hardware=gpu1``.

Each run is its own ``python launch.py`` process: FSDP and the strategies initialise a process group that
must not outlive the test. ``ISDPO_GPU_DRY_RUN=1`` (bench/gpu_check.sh --cpu-dry-run) runs the same checks on
the CPU (``hardware=gpu1`` with ``accelerator=cpu``: bf16-mixed, FSDP over gloo; MFU against a nominal peak), so
the script and these tests are tried before a GPU is lent.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import ROOT

DRY_RUN = os.environ.get("ISDPO_GPU_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN),
                                                  reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")]
DEVICE = "cpu" if DRY_RUN else "cuda"

GPU = ["hardware=gpu1", "hardware.num_workers=0", "hardware.per_device_batch_size=16",
       "hardware.sft_per_device_batch_size=null"]
if DRY_RUN:
    GPU += ["hardware.accelerator=cpu", "hardware.peak_flops=1.0e12", "hardware.torch_threads=1"]
SYNTHETIC = ["task.n_sft_sequences=512", "task.sft.epochs=1", "task.n_pref_prompts=512", "task.train.max_steps=12",
             "task.train.global_batch_size=32", "task.eval.every_n_steps=6", "task.eval.n_prompts=64",
             "task.train.checkpoint_every_n_steps=6", "logger=csv"]


def launch(tmp_path: Path, name: str, overrides: list[str], timeout: int = 600) -> tuple[Path, str]:
    out = tmp_path / name
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *overrides, f"hydra.run.dir={out}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
    return out, log


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def perf(out: Path) -> dict:
    with open(out / "csv" / "align" / "metrics.csv") as fh:
        found = [r for r in csv.DictReader(fh) if r.get("perf/mfu")]
    assert found, "no perf/mfu logged (peak FLOP/s of this GPU unknown? isdpo.flops.PEAK_TFLOPS)"
    return {k: float(v) for k, v in found[-1].items() if v}


def test_bf16_align_on_one_gpu_logs_a_plausible_mfu(tmp_path):
    out, _ = launch(tmp_path, "gpu1", ["stage=align", *GPU, *SYNTHETIC])
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    points = rows(out / "metrics.jsonl")
    assert [r["step"] for r in points] == [0, 6, 12] and points[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert all(0.0 <= r["win_rate"] <= 1.0 and r["kl"] >= -1e-3 for r in points)
    p = perf(out)
    assert 0.0 < p["perf/mfu"] < 1.0 and p["perf/tokens_per_s"] > 0
    # bf16-mixed trains float32 weights: the saved policy is float32
    assert {t.dtype for t in load_file(str(out / "policy" / "model.safetensors")).values()} == {torch.float32}


def test_fsdp_on_one_gpu_trains_checkpoints_resumes_and_saves(tmp_path):
    args = ["stage=align", *GPU, *SYNTHETIC, "hardware.strategy=fsdp", "hardware.activation_checkpointing=true"]
    out, _ = launch(tmp_path, "fsdp", args)
    trained = load_file(str(out / "policy" / "model.safetensors"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    want = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}
    assert want.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(trained[k], want[k].float(), rtol=0, atol=0)
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [0, 6, 12]
    # the same command again resumes at the end (nothing left to train) and writes the same policy
    _, log = launch(tmp_path, "fsdp", args)
    assert "resuming from" in log
    again = load_file(str(out / "policy" / "model.safetensors"))
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], rtol=0, atol=0)


def test_sampling_log_probs_and_golden_rm_run_on_the_gpu(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from isdpo.golden_rm import score
    from isdpo.logprobs import response_logps
    from isdpo.sampling import sample_responses

    paths = build_standins(tmp_path / "standins", n_train=8, n_eval=4)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    lm = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    prompts = [[tok.bos_token_id, 40 + i, 41 + i, 42] for i in range(6)]
    cpu = sample_responses(lm, prompts, max_new_tokens=8, pad_id=tok.pad_token_id, seed=3)
    gpu_lm = lm.to(DEVICE)
    a = sample_responses(gpu_lm, prompts, max_new_tokens=8, pad_id=tok.pad_token_id, seed=3)
    b = sample_responses(gpu_lm, prompts, max_new_tokens=8, pad_id=tok.pad_token_id, seed=3)
    assert a == b and all(len(r) == 8 and all(0 <= t < len(tok) for t in r) for r in a)
    assert len(cpu) == len(a)
    # log-probs of the same pairs on the GPU ("auto" moves a CPU model there for the call) and on the CPU
    lm = gpu_lm.to("cpu")
    on_cpu = response_logps(lm, prompts, a, pad_id=tok.pad_token_id)
    on_gpu = response_logps(lm, prompts, a, pad_id=tok.pad_token_id, device="auto")  # CUDA when there is one
    assert next(lm.parameters()).device.type == "cpu"  # moved back after the call
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-3)
    rm = AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1).eval()
    rm.config.pad_token_id = tok.pad_token_id
    texts = ["a post about my cat", "my job and my money"]
    responses = [" the cat sat", " work is good"]
    s_gpu = score(rm, tok, texts, responses, device="auto")
    s_cpu = score(rm, tok, texts, responses, device="cpu")
    assert next(rm.parameters()).device.type == "cpu"
    torch.testing.assert_close(s_gpu, s_cpu, rtol=0, atol=1e-3)


def test_text_pipeline_on_one_gpu(tmp_path):
    """sft -> golden RM -> relabel -> align -> evaluate on the stand-ins, hardware=gpu1 (bf16-mixed)."""
    paths = build_standins(tmp_path / "standins", n_train=32, n_eval=8)
    out, _ = launch(tmp_path, "text", [*text_overrides(paths, "tldr"), "stage=pipeline", *GPU,
                                       "hardware.per_device_batch_size=4"])
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    assert 0.0 <= json.loads((out / "evaluation.json").read_text())["win_rate"] <= 1.0
    (rm,) = [p for p in (tmp_path / "cache" / "reward").iterdir() if not p.name.startswith(".")]
    assert json.loads((rm / "meta.json").read_text())["steps"] > 0
