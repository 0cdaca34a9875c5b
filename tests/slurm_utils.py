"""Helpers for tests that need a real SLURM cluster.

``scripts/slurm_local.sh`` starts a single-node cluster on this machine (partition
``debug``); on a machine without one, the tests that use ``requires_slurm`` are skipped.

    from slurm_utils import SLURM_MARKS, requires_slurm

    pytestmark = SLURM_MARKS          # a whole module: marker `slurm` + skip when unavailable

    @pytest.mark.slurm
    @requires_slurm                   # one test
    def test_something_on_slurm(tmp_path): ...

``-m slurm`` / ``-m "not slurm"`` select these tests through the registered marker;
``requires_slurm`` skips them when no cluster answers (or ISDPO_SKIP_SLURM=1).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

#: how long one probe of the controller may take before the cluster counts as unreachable
PROBE_TIMEOUT_S = 5.0

START_HINT = "no SLURM cluster reachable; start one with scripts/slurm_local.sh"


def _run(args: list[str], timeout: float = PROBE_TIMEOUT_S) -> subprocess.CompletedProcess | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def _partitions() -> list[tuple[str, bool, bool]]:
    """(name, is_default, is_up) of each partition, or [] when sinfo does not answer."""
    out = _run(["sinfo", "--noheader", "--format=%P %a"])
    if out is None or out.returncode != 0:
        return []
    parts = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        name, avail = fields
        default = name.endswith("*")
        parts.append((name.rstrip("*"), default, avail.lower() == "up"))
    return parts


@functools.lru_cache(maxsize=1)
def slurm_available() -> bool:
    """True when ``sinfo`` answers within a few seconds and some partition is up
    with at least one node that can take a job (idle, mixed or allocated)."""
    if os.environ.get("ISDPO_SKIP_SLURM", "") not in ("", "0"):
        return False
    if not any(up for _, _, up in _partitions()):
        return False
    out = _run(["sinfo", "--noheader", "--responding", "--format=%T"])
    if out is None or out.returncode != 0:
        return False
    states = {s.strip().lower().rstrip("*~#!%$@^-+") for s in out.stdout.split()}
    return bool(states & {"idle", "mixed", "allocated", "completing"})


@functools.lru_cache(maxsize=1)
def slurm_accounting_available() -> bool:
    """True when ``sacct`` answers (slurmdbd running). submitit polls job states with
    sacct; without it a job killed before writing its result is never seen as finished."""
    if not slurm_available():
        return False
    out = _run(["sacct", "--noheader", "--allocations", "--jobs=1", "--format=JobID"], timeout=10)
    return out is not None and out.returncode == 0


@functools.lru_cache(maxsize=1)
def default_partition() -> str | None:
    """The cluster's default partition (``debug`` for scripts/slurm_local.sh), else the
    first one that is up, else None."""
    parts = _partitions()
    for name, default, up in parts:
        if default and up:
            return name
    for name, _, up in parts:
        if up:
            return name
    return None


def job_env_pythonpath(*extra: Path) -> str:
    """A PYTHONPATH for jobs that must import test modules (cloudpickle pickles
    module-level functions by reference): the tests dir, the repo root, then the
    caller's PYTHONPATH. sbatch exports the submitting environment to the job."""
    here = Path(__file__).resolve().parent
    entries = [str(p) for p in (*extra, here, here.parent)]
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(entries)


requires_slurm = pytest.mark.skipif(not slurm_available(), reason=START_HINT)

requires_slurm_accounting = pytest.mark.skipif(
    not slurm_accounting_available(),
    reason="SLURM accounting (sacct) unavailable; scripts/slurm_local.sh starts slurmdbd unless --no-accounting",
)

#: ``pytestmark = SLURM_MARKS``: the registered ``slurm`` marker plus the skip
SLURM_MARKS = [pytest.mark.slurm, requires_slurm]
