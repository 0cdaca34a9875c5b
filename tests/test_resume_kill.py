"""A run killed mid-training the way SLURM kills it, then restarted with the same command, ends with the
same curve as a run that was never interrupted, and continues the same W&B run.

Real processes (``python launch.py stage=align ...``), no mocks:

- local: SIGTERM once ``checkpoints/last.ckpt`` exists, SIGKILL after a grace period (what SLURM does at
  a time limit or on ``scancel``), then the same command again;
- SLURM: the job is submitted by ``hydra/launcher=slurm`` and gets SIGUSR2 from SLURM (``scancel
  --signal=USR2``, the signal ``--signal=USR2@signal_delay_s`` sends before a time limit) once it has a
  checkpoint; submitit -- the one owner of requeue -- counts it as a timeout (timeout_min <= 10 makes
  every warning a timeout), requeues the array task (max_num_timeout=1), the task restarts with the same
  overrides in the same folder and the trainer resumes from last.ckpt.

The uninterrupted reference runs in parallel with the first interrupted run (one SFT reference, built
once in a shared cache under a file lock).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

try:
    from slurm_utils import default_partition, job_env_pythonpath, requires_slurm
except ImportError:  # tests/ imported as a package
    from tests.slurm_utils import default_partition, job_env_pythonpath, requires_slurm

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch.py")

# 24 optimizer steps of the tiny model (2 micro-batches each), last.ckpt every 4 steps, a curve point every
# 8; a cosine schedule with warm-up so that a resume that lost the scheduler state would show.
SIZE = [
    "task.n_sft_sequences=512", "task.sft.epochs=1", "task.n_pref_prompts=256", "task.train.max_steps=24",
    "task.eval.every_n_steps=8", "task.eval.n_prompts=32", "hardware.per_device_batch_size=16",
    "task.train.global_batch_size=32", "task.train.checkpoint_every_n_steps=4", "task.train.schedule=cosine",
    "task.train.warmup_steps=4",
]
ARGS = ["stage=align", "logger=wandb", *SIZE]
STEPS = [0, 8, 16, 24]


def size_group(tmp: Path) -> list[str]:
    """SIZE as a config group on a test search path (``+size=resume``): a short job folder name under
    hydra.sweep.dir (override_dirname), where SIZE's overrides would exceed the 255-byte name limit."""
    (tmp / "testconf" / "size").mkdir(parents=True, exist_ok=True)
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist(SIZE))
    (tmp / "testconf" / "size" / "resume.yaml").write_text("# @package _global_\n" + body)
    return [f"hydra.searchpath=[file://{tmp / 'testconf'}]", "+size=resume"]


def job_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(OMP_NUM_THREADS="1", ISDPO_CACHE_DIR=str(cache), WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=job_env_pythonpath(), PYTHONUNBUFFERED="1")
    return env


def start(out: Path, cache: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    log = log or out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, LAUNCH, *ARGS, f"hydra.run.dir={out}", *extra], cwd=out.parent,
                            env=job_env(cache), stdout=log.open("a"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, within_s: float = 150) -> str:
    try:
        proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run not done within {within_s}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a] == STEPS
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            if isinstance(va, (int, float)):
                assert rb[key] == pytest.approx(va, rel=1e-6, abs=1e-6), (ra["step"], key, va, rb[key])


def wandb_ids(out: Path) -> list[str]:
    """The align stage's W&B run ids, one per process that logged (``offline-run-*/run-<id>.wandb``; the
    SFT stage has a run of its own when this job built the reference)."""
    ids = [f.stem.split("-", 1)[1] for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]
    return [i for i in ids if i.endswith("-align")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Shared cache; ``reference()`` runs the uninterrupted reference once, in this process (it runs while
    the first interrupted attempt runs in its subprocess)."""
    tmp = tmp_path_factory.mktemp("resume")
    state = {"tmp": tmp, "cache": tmp / "cache"}

    def reference() -> list[dict]:
        if "rows" not in state:
            from isdpo.stages import run_stage

            from tests.hydra_utils import compose_cfg

            overrides = [a for a in ARGS if not a.startswith("logger=")] + ["logger=none"]
            cfg = compose_cfg(overrides, tmp / "uninterrupted")
            cfg.paths.cache_dir = str(state["cache"])
            run_stage(cfg)
            state["rows"] = rows(tmp / "uninterrupted" / "run")
        return state["rows"]

    state["reference"] = reference
    return state


def kill_when(path: Path, proc: subprocess.Popen, within_s: float, report: dict) -> None:
    """In a thread: once ``path`` exists, SIGTERM then (after 2 s, SLURM's KillWait here) SIGKILL."""
    deadline = time.monotonic() + within_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    report["ckpt_seen"] = path.exists()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_killed_run_resumes_to_the_same_curve_and_wandb_run(shared):
    tmp, cache = shared["tmp"], shared["cache"]
    out = tmp / "killed"
    log = out.with_suffix(".log")
    proc = start(out, cache)
    report: dict = {}
    killer = threading.Thread(target=kill_when, args=(out / "checkpoints" / "last.ckpt", proc, 180, report))
    killer.start()
    try:
        expected = shared["reference"]()
    finally:
        killer.join()
    assert report["ckpt_seen"], "no checkpoint before the run ended or within 180 s:\n" + log.read_text()[-3000:]
    # No return-code check: Lightning turns SIGTERM into SIGTERMException, a SystemExit(None), so a run that
    # stops within the grace period exits with status 0 (else -9). What counts is that it did not finish:
    assert not (out / "result.json").exists(), "the run finished before it was killed: make it longer"
    done_before = [r["step"] for r in rows(out)] if (out / "metrics.jsonl").exists() else []
    assert done_before[-1:] != [STEPS[-1]], done_before

    text = finish(start(out, cache), log)  # the same command again
    assert f"[isdpo] resuming from {out / 'checkpoints' / 'last.ckpt'}" in text
    assert_same_curve(expected, rows(out))
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["final"] == rows(out)[-1]

    ids = wandb_ids(out)
    assert len(ids) == 2 and ids[0] == ids[1] and ids[0].endswith("-align"), ids  # one W&B run, continued


# wandb: at a requeue SLURM SIGTERMs every process of the job step, the wandb service included; this checks
# that stages._finish() keeps the resulting wandb.finish() error from masking submitit's requeue exit.
SLURM_LOGGER = "wandb"


@pytest.mark.slurm
@requires_slurm
def test_slurm_timeout_requeues_and_resumes(shared):
    """submitit owns requeue: warning signal -> requeue of the array task -> same folder -> resume."""
    tmp, cache = shared["tmp"], shared["cache"]
    expected = shared["reference"]()  # also puts the SFT reference in the cache
    sweep = tmp / "slurm"
    log = tmp / "slurm.log"
    cmd = [sys.executable, LAUNCH, "-m", "hydra/launcher=slurm", "stage=align", f"logger={SLURM_LOGGER}", *size_group(tmp),
           f"hydra.sweep.dir={sweep}",
           f"hydra.launcher.partition={default_partition()}", "hydra.launcher.mem_gb=4",
           "hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=1", "hydra.launcher.signal_delay_s=60",
           "hydra.launcher.name=isdpo-test-requeue"]
    launcher = subprocess.Popen(cmd, cwd=tmp, env=job_env(cache), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        ckpts = []
        deadline = time.monotonic() + 150
        while not ckpts:  # the job's folder is <sweep>/<override_dirname>
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 150 s:\n" + log.read_text()[-3000:]
            ckpts = list(sweep.glob("*/checkpoints/last.ckpt"))
            time.sleep(0.1)
        # submitit's folder of the job (its id: a one-job sweep is a plain job, a larger one an array)
        (job_dir,) = {p.parent for p in (sweep / ".submitit").glob("*/*_0_log.out")}
        job_id = job_dir.name
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        # SLURM holds a requeued job ~60 s before it starts again; then the rest of the run (slow on a loaded box).
        launcher.wait(timeout=400)
    except BaseException:
        launcher.kill()
        subprocess.run(["scancel", "--name=isdpo-test-requeue"], check=False)
        raise
    out = ckpts[0].parent.parent
    assert out.name == "+size=resume"  # override_dirname (stage, logger, hydra/launcher are excluded)
    text = log.read_text()
    job_log = (job_dir / f"{job_id}_0_log.out").read_text() + (job_dir / f"{job_id}_0_log.err").read_text()
    assert launcher.returncode == 0, text[-2000:] + job_log[-3000:]
    assert "this job is timed-out" in job_log and f"Requeued job {job_id}" in job_log, job_log[-3000:]
    assert job_log.count("resuming from") == 1, job_log[-3000:]  # the second attempt, not the first
    assert_same_curve(expected, rows(out))
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    if SLURM_LOGGER == "wandb":
        ids = wandb_ids(out)
        assert len(ids) == 2 and ids[0] == ids[1], ids
