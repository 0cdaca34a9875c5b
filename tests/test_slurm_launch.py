"""`python launch.py -m hydra/launcher=slurm ...` on a real SLURM cluster (scripts/slurm_local.sh), no mocks.

A sweep becomes ONE sbatch job array; every job writes its results into its own folder
(hydra.sweep.subdir = override_dirname); the jobs share one SFT reference, trained once; the launcher's
resources come from the hardware group and reach sbatch as such.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from slurm_utils import SLURM_MARKS, default_partition, job_env_pythonpath, slurm_accounting_available
except ImportError:  # tests/ imported as a package
    from tests.slurm_utils import SLURM_MARKS, default_partition, job_env_pythonpath, slurm_accounting_available

pytestmark = SLURM_MARKS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch.py")

# The reduced synthetic task as a config group on a test search path: `+size=tiny` keeps the job folder
# names (override_dirname) short, where a dozen task.* overrides would exceed the 255-byte name limit.
TINY = """# @package _global_
task:
  n_sft_sequences: 256
  sft: {epochs: 1}
  n_pref_prompts: 128
  train: {max_steps: 4, global_batch_size: 32}
  eval: {every_n_steps: 2, n_prompts: 32}
hardware:
  per_device_batch_size: 16
"""


def tiny_size(tmp: Path) -> list[str]:
    """Overrides that add the ``size/tiny`` config group (found through hydra.searchpath)."""
    (tmp / "testconf" / "size").mkdir(parents=True, exist_ok=True)
    (tmp / "testconf" / "size" / "tiny.yaml").write_text(TINY)
    return [f"hydra.searchpath=[file://{tmp / 'testconf'}]", "+size=tiny"]


def launch_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(OMP_NUM_THREADS="1", ISDPO_CACHE_DIR=str(tmp / "cache"), WANDB_MODE="offline",
               PYTHONPATH=job_env_pythonpath(), PYTHONUNBUFFERED="1")
    return env


def cluster_keys(name: str) -> list[str]:
    return [f"hydra.launcher.partition={default_partition()}", "hydra.launcher.mem_gb=4",
            "hydra.launcher.timeout_min=10", f"hydra.launcher.name={name}"]


def test_sweep_is_one_job_array_with_one_folder_per_job_and_one_sft(tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, LAUNCH, "-m", "hydra/launcher=slurm", "loss=dpo,isdpo", "beta=0.01,0.1",
           *tiny_size(tmp_path), "logger=none", f"hydra.sweep.dir={sweep}", *cluster_keys("isdpo-test-array")]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True,
                              timeout=240, check=False)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=isdpo-test-array"], check=False)
        raise
    elapsed = time.monotonic() - t0
    submitit_dir = sweep / ".submitit"
    logs = "".join(p.read_text()[-1500:] for p in sorted(submitit_dir.glob("*_*/*_log.*")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs

    # one sbatch job array of 4 tasks: <array id>/<array id>_submission.sh and one folder per task
    (script,) = submitit_dir.glob("*/*_submission.sh")
    array_id = script.parent.name
    sbatch = script.read_text()
    assert "#SBATCH --array=0-3%" in sbatch
    for line in ("--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--requeue", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch, line  # derived from hardware=cpu / slurm.yaml
    assert "gpus" not in sbatch  # hardware.accelerator=cpu -> no --gpus-per-node
    tasks = sorted(p.name for p in submitit_dir.iterdir() if p.name.startswith(f"{array_id}_"))
    assert tasks == [f"{array_id}_{i}" for i in range(4)]

    # every job in its own deterministic folder (override_dirname), with its result
    for loss in ("dpo", "isdpo"):
        for beta in (0.01, 0.1):
            out = sweep / f"+size=tiny,beta={beta},loss={loss}"
            result = json.loads((out / "result.json").read_text())
            assert (result["loss"], result["beta"], result["status"]) == (loss, beta, "completed")
            assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 2, 4]
            assert Path(result["output_dir"]) == out

    # one SFT reference for the whole array: trained by one job, reused by the three others
    assert len(list((tmp_path / "cache" / "sft").glob("[0-9a-f]*"))) == 1
    outs = [p.read_text() for p in sorted(submitit_dir.glob(f"{array_id}_*/*_0_log.out"))]
    assert sum("SFT reference trained" in o for o in outs) == 1, outs
    assert sum("SFT reference reused from cache" in o for o in outs) == 3, outs

    if slurm_accounting_available():  # slurmctld sends the records to slurmdbd asynchronously
        deadline = time.monotonic() + 20
        while True:
            states = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", f"--jobs={array_id}",
                                     "--format=JobID,State"], capture_output=True, text=True, check=True).stdout
            rows = dict(line.split("|") for line in states.split())
            if {rows.get(f"{array_id}_{i}") for i in range(4)} == {"COMPLETED"} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {rows.get(f"{array_id}_{i}") for i in range(4)} == {"COMPLETED"}, states
    assert elapsed < 180, f"the 4-job array took {elapsed:.0f} s"


@pytest.mark.parametrize("hardware, nodes, tasks, gpus, cpus", [
    ("h100x4", 1, 4, 4, 5),            # 4 workers + 1 main-process thread per task
    ("h100x8_2nodes", 2, 8, 8, 5),
    ("cpu_ddp2", 1, 2, None, 1),
])
def test_launcher_resources_come_from_the_hardware_group(tmp_path, hardware, nodes, tasks, gpus, cpus):
    """The sbatch script submitit writes for `hardware=<x>`; `--test-only` so that nothing runs even on a
    cluster with GPUs (this one has no GRES and rejects --gpus-per-node outright)."""
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, LAUNCH, "-m", "hydra/launcher=slurm", f"hardware={hardware}", "seed=0,1",
           f"hydra.sweep.dir={sweep}", "+hydra.launcher.additional_parameters.test-only=true",
           *cluster_keys("isdpo-test-resources")]
    subprocess.run(cmd, cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=60,
                   check=False)  # fails: submitit finds no job id after --test-only (or the GRES is rejected)
    (script,) = sweep.glob(".submitit/**/*submission*.sh")
    sbatch = script.read_text()
    assert f"#SBATCH --nodes={nodes}\n" in sbatch
    assert f"#SBATCH --ntasks-per-node={tasks}\n" in sbatch
    assert f"#SBATCH --cpus-per-task={cpus}\n" in sbatch
    if gpus is None:
        assert "gpus" not in sbatch
    else:
        assert f"#SBATCH --gpus-per-node={gpus}\n" in sbatch
    assert "#SBATCH --array=0-1%2\n" in sbatch and "#SBATCH --test-only\n" in sbatch
