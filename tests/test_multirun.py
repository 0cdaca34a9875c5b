"""`python launch.py -m loss=isdpo,dpo beta=0.01,0.05,0.1` runs 6 jobs, each in its own folder with a
result.json, all reusing one SFT reference."""
import json
import os
import subprocess
import sys

from tests.hydra_utils import ROOT, SMALL


def test_local_sweep_runs_six_jobs_with_one_reference(tmp_path):
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    small = [o for o in SMALL if "eval.n_prompts" not in o] + ["task.eval.n_prompts=32"]
    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", "loss=isdpo,dpo", "beta=0.01,0.05,0.1", *small,
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((tmp_path / "multirun").glob("*/result.json"))
    assert len(results) == 6
    seen = set()
    for path in results:
        res = json.loads(path.read_text())
        assert res["status"] == "completed"
        # the folder name is the job's own overrides
        assert f"beta={res['beta']}" in path.parent.name and f"loss={res['loss']}" in path.parent.name
        seen.add((res["loss"], res["beta"]))
    assert seen == {(loss, b) for loss in ("isdpo", "dpo") for b in (0.01, 0.05, 0.1)}
    assert len(list((tmp_path / "cache" / "sft").glob("[0-9a-f]*"))) == 1
    assert proc.stdout.count("SFT reference reused from cache") == 5
