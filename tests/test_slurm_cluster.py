"""Job submission to a real SLURM cluster through submitit (no mocks).

Start a single-node cluster first with ``scripts/slurm_local.sh``; without one these
tests are skipped. Select them with ``pytest -m slurm``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    from slurm_utils import (
        SLURM_MARKS,
        default_partition,
        job_env_pythonpath,
        requires_slurm_accounting,
        slurm_accounting_available,
    )
except ImportError:  # tests/ imported as a package
    from tests.slurm_utils import (
        SLURM_MARKS,
        default_partition,
        job_env_pythonpath,
        requires_slurm_accounting,
        slurm_accounting_available,
    )

submitit = pytest.importorskip("submitit")

pytestmark = SLURM_MARKS


def square_and_report(x: int) -> dict:
    """Runs inside the SLURM job: prints to the job's stdout log and returns what it saw."""
    print(f"square_and_report({x}) on {os.uname().nodename}", flush=True)
    return {
        "x": x,
        "square": x * x,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


def _wait_done(jobs, within_s: float = 50.0) -> None:
    """Wait for the jobs with a deadline (job.result() alone can wait forever when sacct is
    unavailable and a job dies without writing its result); cancel them on timeout."""
    deadline = time.monotonic() + within_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *{job.job_id.split("_")[0] for job in jobs}], check=False)
            logs = "\n".join(job.paths.stderr.read_text()[-1500:] for job in jobs if job.paths.stderr.exists())
            squeue = subprocess.run(["squeue"], capture_output=True, text=True, check=False).stdout
            pytest.fail(f"jobs not done within {within_s}s\nsqueue:\n{squeue}\nstderr:\n{logs}")
        time.sleep(0.5)


def _sacct_state(job, until: str, within_s: float = 20.0) -> str:
    """The job's state as sacct reports it (slurmctld sends records to slurmdbd asynchronously)."""
    deadline = time.monotonic() + within_s
    state = ""
    while time.monotonic() < deadline:
        state = job.get_info(mode="force").get("State", "")
        if state.startswith(until):
            break
        time.sleep(0.5)
    return state


def test_job_array_through_submitit(tmp_path, monkeypatch):
    # the job unpickles square_and_report by reference: it must import this module
    monkeypatch.setenv("PYTHONPATH", job_env_pythonpath())
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        name="isdpo-slurm-test",
        timeout_min=5,
        cpus_per_task=1,
        mem_gb=1,
        slurm_partition=default_partition(),
        slurm_array_parallelism=4,
    )
    inputs = [1, 2, 3, 4]
    t0 = time.monotonic()
    jobs = executor.map_array(square_and_report, inputs)
    assert len(jobs) == 4
    # one array: all four jobs share the array id, tasks 0..3
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]

    _wait_done(jobs)
    results = [job.result() for job in jobs]
    elapsed = time.monotonic() - t0
    assert [r["square"] for r in results] == [1, 4, 9, 16]
    assert [r["x"] for r in results] == inputs
    assert {r["array_job_id"] for r in results} == array_ids
    assert sorted(r["array_task_id"] for r in results) == ["0", "1", "2", "3"]
    assert all(r["job_id"] for r in results)
    assert elapsed < 60, f"4 array jobs took {elapsed:.1f}s"

    for job, x in zip(jobs, inputs):
        if slurm_accounting_available():  # without sacct submitit reports UNKNOWN
            assert _sacct_state(job, until="COMPLETED") == "COMPLETED"
        assert job.paths.stdout.exists(), job.paths.stdout
        assert f"square_and_report({x})" in job.paths.stdout.read_text()
        assert job.paths.stderr.exists(), job.paths.stderr
    # submitit's sbatch script for the whole array (in the folder named after the array id)
    (array_id,) = array_ids
    sbatch = (tmp_path / array_id / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%4" in sbatch
    assert "gpus" not in sbatch  # CPU jobs need no --gpus-per-node


def test_failed_job_raises(tmp_path, monkeypatch):
    """A job whose function raises comes back as a FailedJobError carrying the traceback."""
    monkeypatch.setenv("PYTHONPATH", job_env_pythonpath())
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_partition=default_partition())
    job = executor.submit(divmod, 1, 0)
    _wait_done([job])
    with pytest.raises(submitit.core.utils.FailedJobError, match="ZeroDivisionError"):
        job.result()


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@requires_slurm_accounting
def test_cancelled_job_is_seen_as_finished(tmp_path, monkeypatch):
    """A job killed before it writes its result is only seen as finished through sacct:
    submitit must report it CANCELLED instead of waiting forever."""
    monkeypatch.setenv("PYTHONPATH", job_env_pythonpath())
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=default_partition())
    job = executor.submit(sleep_for, 300)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        squeue = subprocess.run(["squeue", "--noheader", "--jobs", job.job_id, "--format=%T"],
                                capture_output=True, text=True, check=False)
        if squeue.stdout.strip() == "RUNNING":
            break
        time.sleep(0.3)
    subprocess.run(["scancel", job.job_id], check=True)
    deadline = time.monotonic() + 30
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, f"cancelled job still not done; state {job.state}"
        time.sleep(0.5)
    assert job.state.startswith("CANCELLED"), job.state  # e.g. "CANCELLED by 0"
    assert not job.paths.result_pickle.exists()


HYDRA_APP = """
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    env = [os.environ.get(k, "-") for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "APP_SETUP")]
    (out / "result.txt").write_text(" ".join([str(cfg.x * 2), *env]))
    return cfg.x * 2


if __name__ == "__main__":
    main()
"""

#: the hydra-submitit-launcher keys that work on the scripts/slurm_local.sh cluster (CPU only:
#: gpus_per_node must stay null or 0 -- the cluster has no GRES, so >=1 is rejected by sbatch)
SUBMITIT_SLURM_OVERRIDES = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.timeout_min=5",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.nodes=1",
    "hydra.launcher.array_parallelism=4",
    "hydra.launcher.setup=['export APP_SETUP=ran']",
]


def test_hydra_submitit_slurm_launcher_multirun(tmp_path):
    """`-m x=1,2,3,4 hydra/launcher=submitit_slurm`: one job array of 4, each job writes
    into its own Hydra output dir."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    app = tmp_path / "app"
    app.mkdir()
    (app / "my_app.py").write_text(textwrap.dedent(HYDRA_APP))
    (app / "config.yaml").write_text("x: 0\n")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "my_app.py", "-m", "x=1,2,3,4", f"hydra.sweep.dir={sweep}",
           f"hydra.launcher.partition={default_partition()}", *SUBMITIT_SLURM_OVERRIDES]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=app, capture_output=True, text=True, timeout=55, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 55

    results = [(sweep / str(i) / "result.txt").read_text().split() for i in range(4)]
    assert [r[0] for r in results] == ["2", "4", "6", "8"]
    assert len({r[1] for r in results}) == 1  # one array job
    assert sorted(r[2] for r in results) == ["0", "1", "2", "3"]
    assert {r[3] for r in results} == {"ran"}  # hydra.launcher.setup lines ran in the job
    (submission,) = Path(sweep, ".submitit").glob("*/*_submission.sh")
    sbatch = submission.read_text()
    assert "#SBATCH --array=0-3%4" in sbatch
    assert "#SBATCH --signal=USR2@120" in sbatch  # hydra's signal_delay_s default
