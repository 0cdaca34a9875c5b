"""hydra/launcher=joblib (conf/hydra/launcher/joblib.yaml): a sweep's jobs run at the same time in worker
processes, which compose the job's config themselves (the schemas and resolvers launch.py registers travel
with Hydra's state), and share the SFT reference through the cache."""
import json
import os
import subprocess
import sys

from omegaconf import OmegaConf

from tests.hydra_utils import ROOT, SMALL
from tests.test_sweeps import hydra_cfg


def test_joblib_launcher_composes_one_job_per_core_and_one_thread():
    launcher = OmegaConf.to_container(hydra_cfg(["hydra/launcher=joblib"]).hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    # one job per core, handed out one by one (the plugin's schema types batch_size as a string)
    assert launcher["n_jobs"] == -1 and str(launcher["batch_size"]) == "1"
    assert hydra_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]).hydra.launcher.n_jobs == 2
    assert hydra_cfg(["hydra/launcher=joblib"]).hardware.torch_threads == 1


def test_joblib_sweep_runs_its_jobs_in_parallel_workers(tmp_path):
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "launch.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "loss=dpo,isdpo",
           *SMALL, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in log and "is launching 2 jobs" in log
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert sorted(r["loss"] for r in results) == ["dpo", "isdpo"]
    for r in results:
        assert r["status"] == "completed" and r["final"]["step"] == 8 and 0.0 <= r["final"]["win_rate"] <= 1.0
        assert r["timing"]["train"]["cpu_s"] > 0  # the job's own phases, measured in its worker
    # one SFT reference for both jobs: one trained it, the other waited for it and reused it
    assert log.count("SFT reference trained") == 1 and log.count("SFT reference reused from cache") == 1
    assert len(list((tmp_path / "cache" / "sft").glob("[0-9a-f]*"))) == 1
    # Lightning's lines once, not twice (launch.py's logging setting holds in the workers too)
    assert log.count("`Trainer.fit` stopped: `max_steps=8` reached.") == 2
