"""Job submission to a real SLURM cluster through submitit (no mocks).

Start a single-node cluster first with ``scripts/slurm_local.sh``; without one these
tests are skipped. Select them with ``pytest -m slurm``.
"""

from __future__ import annotations

import os
import time

import pytest

try:
    from slurm_utils import SLURM_MARKS, default_partition, job_env_pythonpath
except ImportError:  # tests/ imported as a package
    from tests.slurm_utils import SLURM_MARKS, default_partition, job_env_pythonpath

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

    results = [job.result() for job in jobs]
    elapsed = time.monotonic() - t0
    assert [r["square"] for r in results] == [1, 4, 9, 16]
    assert [r["x"] for r in results] == inputs
    assert {r["array_job_id"] for r in results} == array_ids
    assert sorted(r["array_task_id"] for r in results) == ["0", "1", "2", "3"]
    assert all(r["job_id"] for r in results)
    assert elapsed < 60, f"4 array jobs took {elapsed:.1f}s"

    for job, x in zip(jobs, inputs):
        assert job.state in ("COMPLETED", "UNKNOWN") or job.done()
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
    with pytest.raises(submitit.core.utils.FailedJobError, match="ZeroDivisionError"):
        job.result()
