"""The shared cache (isdpo.artifacts): keys follow the data's bytes, broken entries are rebuilt, orphaned
temporary builds are removed, and data-parallel ranks never wait on each other's lock (rank 0 builds or
publishes, the other ranks wait for the entry)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from isdpo import artifacts as cache
from isdpo.artifacts import BUILDER, cached_dir, check_complete, config_hash, data_key, publish, relabel_key, reward_key
from isdpo.distributed import rank_world
from isdpo.tasks.text import TextRuntime
from tests.fixtures_text import build_standins, text_overrides
from tests.hydra_utils import ROOT, compose_cfg

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def single(monkeypatch):
    """No launcher variables: one process."""
    for v in RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def as_rank(monkeypatch, rank: int, world: int = 2, wait_s: float = 1.0) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` (short wait for the entry)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv(cache.WAIT_ENV, str(wait_s))
    monkeypatch.setattr(cache, "POLL_S", 0.05)


def writer(name: str, content: bytes = b"x" * 100, calls: list | None = None):
    def build(tmp: Path) -> None:
        if calls is not None:
            calls.append(tmp)
        (tmp / "sub").mkdir()
        (tmp / "sub" / name).write_bytes(content)
    return build


# --------------------------------------------------------------------------------------------
# Ranks from the launcher's environment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4)),               # torchrun
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, (1, 2)),           # a rank Lightning started
    ({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"}, (0, 2)),           # rank 0 after it started them
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),                         # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),  # Lightning in sbatch
])
def test_rank_world_from_launcher_environment(single, env, expected):
    for k, v in env.items():
        single.setenv(k, v)
    assert rank_world() == expected


def test_later_node_of_a_lightning_launch_is_not_rank_zero(single):
    single.setenv("NODE_RANK", "1")  # before its processes start: no WORLD_SIZE yet
    rank, world = rank_world()
    assert rank > 0 and world > 1


# --------------------------------------------------------------------------------------------
# Keys follow the bytes of local data files
# --------------------------------------------------------------------------------------------


def test_data_key_of_a_hub_set_names_its_revision():
    assert data_key({"dataset": "org/set", "data_files": None}, ["train"]) == {"dataset": "org/set",
                                                                              "revision": "unpinned"}
    assert data_key({"dataset": "org/set", "revision": "abc1"}, ["train"])["revision"] == "abc1"


def test_text_cache_keys_follow_the_data_files_content(tmp_path):
    paths = build_standins(tmp_path / "standins", n_train=8, n_eval=4)
    cfg = compose_cfg(text_overrides(paths, "tldr"), tmp_path)
    rt = TextRuntime(cfg.task, cfg.model, tmp_path / "cache")

    def keys() -> dict:
        return {"sft": config_hash(rt.sft_key()), "reward": config_hash(reward_key(cfg.task)),
                "relabel": config_hash(relabel_key(cfg.task, cfg.model, {"build_id": "rm"}, None))}

    before = keys()
    train = Path(paths["tldr_train"])
    train.write_bytes(train.read_bytes())  # same bytes, new mtime
    os.utime(train, (time.time() + 5, time.time() + 5))
    assert keys() == before
    rows = train.read_text().splitlines()
    train.write_text("\n".join(reversed(rows)) + "\n")  # same size, other content
    after_train = keys()
    assert after_train["reward"] != before["reward"] and after_train["relabel"] != before["relabel"]
    assert after_train["sft"] == before["sft"]  # the SFT set does not read the preference file
    sft = Path(paths["tldr_sft"])
    sft.write_text(sft.read_text().replace("advice", "advise", 1))
    after_sft = keys()
    assert after_sft["sft"] != after_train["sft"]
    assert after_sft["reward"] != after_train["reward"]  # the RM starts from that SFT model
    assert after_sft["relabel"] == after_train["relabel"]


# --------------------------------------------------------------------------------------------
# Broken entries, orphaned builds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_incomplete_entry_is_reported_and_rebuilt(single, tmp_path, capsys, damage):
    calls = []
    path, hit = cached_dir(tmp_path, "sft", {"a": 1}, writer("model.safetensors", calls=calls))
    assert not hit and len(calls) == 1
    f = path / "sub" / "model.safetensors"
    f.write_bytes(b"x" * 10) if damage == "truncate" else f.unlink()
    path2, hit = cached_dir(tmp_path, "sft", {"a": 1}, writer("model.safetensors", calls=calls))
    assert path2 == path and not hit and len(calls) == 2
    assert f.read_bytes() == b"x" * 100
    assert "is incomplete (sub/model.safetensors" in capsys.readouterr().out
    assert cached_dir(tmp_path, "sft", {"a": 1}, writer("model.safetensors", calls=calls))[1]  # whole again: a hit


def test_published_entry_incomplete_is_rebuilt_and_refused_by_readers(single, tmp_path):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "pairs.jsonl").write_text('{"prompt": "p"}\n' * 20)
        return {"n": 20}

    out = tmp_path / "relabel" / "abc"
    publish(out, build, fast_dev_run=False, what="relabelled preferences", collective=False)
    (out / "pairs.jsonl").write_text('{"prompt": "p"}\n')  # truncated
    with pytest.raises(FileNotFoundError, match="is incomplete .*pairs.jsonl.*rerun stage=relabel"):
        check_complete(out, "relabelled preference set", "stage=relabel")
    _, reused = publish(out, build, fast_dev_run=False, what="relabelled preferences", collective=False)
    assert not reused and len(calls) == 2
    assert check_complete(out, "relabelled preference set", "stage=relabel")["n"] == 20


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_temporary_builds_are_removed_live_ones_kept(single, tmp_path):
    key = {"a": 2}
    final = tmp_path / "sft" / config_hash({"cache_version": cache.CACHE_VERSION, "key": key})
    dead, live, other = (final.parent / f".tmp-{final.name}-{s}" for s in ("dead", "live", "other"))
    for d, pid in ((dead, dead_pid()), (live, os.getpid())):
        d.mkdir(parents=True)
        (d / BUILDER).write_text(json.dumps({"host": cache.socket.gethostname(), "pid": pid}))
    other.mkdir()  # a build of another host: kept while its heartbeat is recent
    (other / BUILDER).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    cached_dir(tmp_path, "sft", key, writer("w"))
    assert not dead.exists() and live.exists() and other.exists()
    old = time.time() - 3600
    os.utime(other / BUILDER, (old, old))
    cached_dir(tmp_path, "sft", {"a": 3}, writer("w"))  # another entry: leaves this one's builds alone
    assert other.exists()
    assert cached_dir(tmp_path, "sft", key, writer("w"))[1]  # a later run that reuses the entry cleans too
    assert not other.exists() and live.exists()


def test_build_killed_midway_is_cleaned_by_the_next_run(single, tmp_path):
    started = tmp_path / "started"
    code = ("import sys, time; from pathlib import Path; from isdpo.artifacts import cached_dir; "
            "cached_dir(sys.argv[1], 'sft', {'k': 1}, lambda tmp: (Path(sys.argv[2]).touch(), time.sleep(120)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"), str(started)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert started.exists(), "the build never started"
    finally:
        proc.kill()
        proc.wait()
    (orphan,) = (tmp_path / "cache" / "sft").glob(".tmp-*")
    path, hit = cached_dir(tmp_path / "cache", "sft", {"k": 1}, writer("w"))
    assert not hit and (path / "sub" / "w").exists() and not orphan.exists()


def test_a_build_records_its_builder_and_leaves_no_temporary_dir(single, tmp_path):
    seen = []

    def build(tmp: Path) -> None:
        seen.append(json.loads((tmp / BUILDER).read_text()))
        (tmp / "f").write_text("1")

    path, _ = cached_dir(tmp_path, "k", {}, build)
    assert seen[0]["pid"] == os.getpid()
    assert not (path / BUILDER).exists() and not list(path.parent.glob(".tmp-*"))
    assert json.loads((path / "manifest.json").read_text())["files"] == {"f": 1, "key.json": (path / "key.json").stat().st_size}


# --------------------------------------------------------------------------------------------
# Data-parallel ranks
# --------------------------------------------------------------------------------------------


def test_rank_zero_builds_a_single_process_entry(single, tmp_path):
    as_rank(single, 0)
    calls = []
    path, hit = cached_dir(tmp_path, "preferences", {"b": 1}, writer("pairs.pt", calls=calls))
    assert not hit and len(calls) == 1 and (path / "sub" / "pairs.pt").exists()


def test_other_rank_waits_for_rank_zero_instead_of_building(single, tmp_path):
    as_rank(single, 1, wait_s=30)
    key = {"cache_version": cache.CACHE_VERSION, "key": {"b": 2}}
    final = tmp_path / "preferences" / config_hash(key)

    def rank_zero() -> None:  # publishes the way build_once does, a little later
        time.sleep(0.5)
        tmp = final.parent / ".tmp-x"
        tmp.mkdir(parents=True)
        (tmp / "pairs.pt").write_text("p")
        (tmp / "key.json").write_text(json.dumps(key))
        os.replace(tmp, final)

    thread = threading.Thread(target=rank_zero)
    thread.start()
    calls = []
    path, _ = cached_dir(tmp_path, "preferences", {"b": 2}, writer("pairs.pt", calls=calls))
    thread.join()
    assert path == final and calls == [] and (path / "pairs.pt").read_text() == "p"


def test_other_rank_times_out_with_a_clear_message(single, tmp_path):
    as_rank(single, 1, wait_s=0.3)
    calls = []
    with pytest.raises(TimeoutError, match=r"rank 1: the preferences cache entry did not appear at .*ISDPO_CACHE_WAIT_S"):
        cached_dir(tmp_path, "preferences", {"b": 3}, writer("pairs.pt", calls=calls))
    assert calls == []


def test_collective_build_runs_on_a_lightning_started_rank_which_does_not_publish(single, tmp_path):
    """A rank Lightning started (LOCAL_RANK=1, no RANK) trains with rank 0 but leaves publishing to it."""
    single.setenv("LOCAL_RANK", "1")
    single.setenv("NODE_RANK", "0")
    single.setenv("WORLD_SIZE", "2")
    single.setenv(cache.WAIT_ENV, "0.3")
    single.setattr(cache, "POLL_S", 0.05)
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "model").mkdir()
        return {}

    out = tmp_path / "reward" / "abc"
    with pytest.raises(TimeoutError, match="golden reward model did not appear"):
        publish(out, build, fast_dev_run=False, what="golden reward model")
    assert len(calls) == 1 and not out.exists() and not list(out.parent.glob(".tmp-*"))


def test_ranks_of_one_job_never_wait_on_the_lock(single, tmp_path):
    """Rank 0 holds the entry's lock (as inside fit); rank 1 of a collective build must not block on it."""
    as_rank(single, 1, wait_s=0.3)
    final = tmp_path / "sft" / config_hash({"cache_version": cache.CACHE_VERSION, "key": {"c": 1}})
    calls = []
    with cache.file_lock(final.parent / f".{final.name}.lock"):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            cached_dir(tmp_path, "sft", {"c": 1}, writer("m", calls=calls), collective=True)
    assert len(calls) == 1 and time.monotonic() - started < 10
