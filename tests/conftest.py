import fcntl
import os
import time
from pathlib import Path

import pytest
import torch
from xdist.scheduler import LoadScopeScheduling

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny matmuls gain nothing from a second thread, and under load OpenMP spinning makes them ~10x slower.
torch.set_num_threads(1)


def idle_cores(seconds: float = 0.5) -> float:
    """Cores left idle over the next ``seconds``, from /proc/stat (the load average lags by minutes: right after a
    pip install or another test run it still reads busy on an idle machine); cpu_count where /proc/stat is absent."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float(os.cpu_count() or 1)
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): the whole suite runs on the idle cores. Chosen tests (paths or node ids on
    the command line) run in this one process, where -s, --pdb and a quick rerun work as usual; so does the suite on
    a busy machine, where a second worker would only take CPU from the first and push the timed subprocess tests
    past their limits. ``-n N`` decides."""
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return 0
    idle = round(idle_cores())
    return idle if idle >= 2 else 0


class OneSlurmUnit(LoadScopeScheduling):
    """Work units for the suite on several workers: every test a unit of its own, so the workers stay busy to the
    end, except the SLURM tests, one unit: on one worker, one at a time, the cluster theirs (a job queued behind
    another test's would run into its timeouts). It is the largest unit, so it starts first, and its waits on the
    cluster overlap the other worker's tests. xdist's own ``--dist loadgroup`` would do this from an
    ``xdist_group`` mark, but under pytest 9.2 it drops the groups silently (pytest-xdist#1386), and the scheduler
    sees node ids only: a SLURM test is one whose id says "slurm" (``pytest_collection_modifyitems`` holds every
    test marked ``slurm`` to that)."""

    def _split_scope(self, nodeid: str) -> str:
        return "slurm" if "slurm" in nodeid else nodeid


def pytest_xdist_make_scheduler(config, log):
    """``-n`` without a ``--dist`` of one's own (xdist's default, "load"): :class:`OneSlurmUnit`."""
    return OneSlurmUnit(config, log) if config.getvalue("dist") == "load" else None


def pytest_collection_modifyitems(config, items):
    unnamed = [item.nodeid for item in items if item.get_closest_marker("slurm") and "slurm" not in item.nodeid]
    if unnamed:
        raise pytest.UsageError("a test marked slurm must say slurm in its file or test name (conftest's "
                                f"OneSlurmUnit schedules the SLURM tests by name): {', '.join(unnamed)}")


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session that every xdist worker sees (each worker has its own base temp)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(autouse=True)
def slurm_cluster_turn(request, tmp_path_factory):
    """A test marked ``slurm`` has the one local cluster to itself: another worker's SLURM test waits for its turn
    (its jobs would otherwise queue behind these and run into its timeouts)."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    with open(session_folder(tmp_path_factory) / "slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One artefact cache for the tests that build the same entries (the SMALL task's SFT reference and preference
    set): the store is content-addressed and safe for concurrent processes, so an entry is what its key says
    whichever test (or xdist worker) built it. A test about the cache itself (what it reuses, how many entries it
    holds) keeps its own."""
    path = session_folder(tmp_path_factory) / "shared_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
