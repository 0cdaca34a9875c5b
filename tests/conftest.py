import fcntl
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny matmuls gain nothing from a second thread, and under load OpenMP spinning makes them ~10x slower.
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): the whole suite runs on the idle cores, a file's tests on one worker (their
    module fixtures are built once). Chosen tests (paths or node ids on the command line) run in this one process,
    where -s, --pdb and a quick rerun work as usual; so does the suite on a busy machine, where a second worker
    would only take CPU from the first and push the timed subprocess tests past their limits. ``-n N`` decides."""
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return 0
    idle = round(os.cpu_count() - os.getloadavg()[0])
    return idle if idle >= 2 else 0


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
