"""Data parallelism: 2 CPU processes (DDP over gloo) train to the same policy as 1 process with the
same global batch, since each rank sees its half of the same seeded global batch and DDP averages.

The ``ddp`` tests start 2-process jobs on an EMPTY cache (``pytest -m ddp``): every cached artefact is
then built while Lightning starts the second rank from inside the first ``fit``, which used to deadlock
(rank 0 held the cache lock while it waited for rank 1 in ``fit``; rank 1 waited for the lock)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.fixtures_text import build_standins, text_overrides
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


# Tiny sizes: the point is that every cached artefact is built under 2 ranks, not what they learn.
COLD = [
    "hardware=cpu_ddp2", "hardware.per_device_batch_size=8", "logger=none", "task.n_sft_sequences=64",
    "task.sft.epochs=1", "task.sft.batch_size=32", "task.n_pref_prompts=32", "task.train.max_steps=2",
    "task.train.global_batch_size=16", "task.eval.every_n_steps=0", "task.eval.n_prompts=8",
    "task.train.checkpoint_every_n_steps=0",
]
COLD_TIMEOUT_S = 300


def launch_cold(tmp_path: Path, overrides: list[str], launcher: tuple[str, ...] = ()) -> tuple[Path, str]:
    """``python [launcher] launch.py`` on an empty cache in its own process group (all ranks are killed on a
    timeout); without a launcher, Lightning starts the second rank itself. Returns the run folder and the log."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "ISDPO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "ISDPO_CACHE_WAIT_S": "240"}
    cmd = [sys.executable, *launcher, str(ROOT / "launch.py"), *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=COLD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"no exit within {COLD_TIMEOUT_S} s (deadlock?):\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    assert not list(cache.rglob(".tmp-*")), "temporary build directories left behind"
    return out, log


def entries(cache: Path, kind: str) -> list[Path]:
    found = [p for p in (cache / kind).iterdir() if not p.name.startswith(".")]
    for p in found:
        files = json.loads((p / "manifest.json").read_text())["files"]
        assert all((p / f).stat().st_size == n for f, n in files.items()), p
    return found


@pytest.mark.ddp
@pytest.mark.parametrize("stage", ["sft", "align", "pipeline"])
def test_cold_cache_two_ranks_synthetic(tmp_path, stage):
    out, _ = launch_cold(tmp_path, [f"stage={stage}", *COLD])
    (sft,) = entries(tmp_path / "cache", "sft")  # one entry, published once (by rank 0)
    assert (sft / "model" / "model.safetensors").exists()
    if stage == "sft":
        return
    (prefs,) = entries(tmp_path / "cache", "preferences")
    assert (prefs / "pairs.pt").exists()
    assert (out / "policy" / "model.safetensors").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    if stage == "pipeline":
        assert 0.0 <= json.loads((out / "evaluation.json").read_text())["win_rate"] <= 1.0


@pytest.mark.ddp
def test_cold_cache_two_ranks_under_torchrun(tmp_path):
    """Both ranks start together (no Lightning spawning): the SFT trains on both, rank 0 samples the pairs."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out, _ = launch_cold(tmp_path, ["stage=pipeline", *COLD], launcher=torchrun)
    assert len(entries(tmp_path / "cache", "sft")) == 1 and len(entries(tmp_path / "cache", "preferences")) == 1
    assert (out / "evaluation.json").exists()
    # The same command again: the run completed and kept no checkpoint (checkpoint_every_n_steps=0), so both
    # ranks find it finished from the files and neither trains (nor waits for the other in a collective).
    result = (out / "result.json").read_text()
    _, log = launch_cold(tmp_path, ["stage=pipeline", *COLD], launcher=torchrun)
    assert "nothing to train" in log and "training for" not in log, log[-3000:]
    assert (out / "result.json").read_text() == result


@pytest.mark.ddp
def test_cold_cache_two_ranks_text_pipeline(tmp_path):
    """sft -> golden RM (trained on both ranks) -> relabel and reference log-probs (rank 0) -> align."""
    paths = build_standins(tmp_path / "standins", n_train=32, n_eval=8)
    out, _ = launch_cold(tmp_path, [*text_overrides(paths, "tldr"), "stage=pipeline", "hardware=cpu_ddp2",
                                 "task.eval.every_n_steps=0"])
    cache = tmp_path / "cache"
    assert len(entries(cache, "sft")) == 1  # the policy's and the RM base's SFT coincide (same model)
    (rm,) = entries(cache, "reward")
    assert json.loads((rm / "meta.json").read_text())["steps"] > 0
    (relabelled,) = entries(cache, "relabel")
    assert (relabelled / "pairs.jsonl").stat().st_size > 0
    (ref,) = entries(cache, "ref_logps")
    assert (ref / "ref_logps.pt").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    assert (out / "evaluation.json").exists()
