"""Every config in conf/ composes and validates; bad values stop the run with a message naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from isdpo.config import ConfigError, validate
from tests.hydra_utils import CONF, ROOT, SMALL, compose_cfg

# sweep/ (a link to sweeps/) is appended with +sweep=NAME and checked in tests/test_sweeps.py
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "sweep"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in group_options(g)], ids=lambda v: str(v)
)
def test_every_config_composes_and_validates(group, option, tmp_path):
    # text tasks need a pretrained model with a tokenizer (the tiny default has none): pair them with the paper's
    extra = ["model=llama32_3b"] if group == "task" and option in ("tldr", "hh") else []
    if group == "judge" and option != "none":  # judges read text: a text task
        extra = ["task=hh", "model=llama32_3b"]
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    local = cfg.model.pretrained and str(cfg.model.pretrained).startswith(("/", ".", "~"))
    if group == "model" and local and not (ROOT / str(cfg.model.pretrained)).exists():
        pytest.skip(f"model={option} points to a local file that a fresh checkout does not have")
    validate(cfg)


def test_every_config_key_is_documented():
    """Config is data: every key in conf/ carries a one-line comment (on its line or the line above)."""
    missing = []
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
                continue
            documented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
            parent_doc = line.startswith(" ") and any(
                "#" in lines[j] for j in range(i - 1, -1, -1) if not lines[j].startswith(" " * (len(line) - len(line.lstrip())))
            )
            if not (documented or parent_doc):
                missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {stripped}")
    assert not missing, "undocumented config keys:\n" + "\n".join(missing)


BAD = [
    (["loss.base=nope"], r"loss.base='nope' is not a known loss; available: .*dpo"),
    (["beta=-0.1"], r"beta must be > 0"),
    (["beta=0"], r"beta must be > 0"),
    (["loss.importance_sampling.log_clip=-1"], r"loss.importance_sampling.log_clip must be >= 0"),
    (["stage=nope"], r"stage='nope' is not known; allowed: sft, reward, relabel, align, evaluate, judge, pipeline"),
    (["task.eval.top_p=1.5"], r"task.eval.top_p must be in \(0, 1\]"),
    (["task.train.global_batch_size=50"], r"global_batch_size=50 is not a multiple of hardware.per_device_batch_size"),
    (["model.pretrained=/nonexistent/model"], r"model.pretrained='/nonexistent/model': no such file"),
    (["logger.mode=sometimes"], r"logger.mode='sometimes' is not known; allowed: auto, online, offline"),
    (["seed=-1"], r"seed must be an integer in \[0, 2\*\*32\) \(got -1\)"),
    (["seed=4294967296"], r"seed must be an integer in \[0, 2\*\*32\) \(got 4294967296\)"),
    (["seed=1.5"], r"seed must be an integer in \[0, 2\*\*32\) \(got 1.5\)"),
    (["seed=true"], r"seed must be an integer in \[0, 2\*\*32\) \(got True\)"),
    (["seed=abc"], r"seed must be an integer in \[0, 2\*\*32\) \(got 'abc'\)"),
    (["task.sft.seed=-3"], r"task.sft.seed must be an integer in \[0, 2\*\*32\)"),
    (["task.eval.seed=0.5"], r"task.eval.seed must be an integer in \[0, 2\*\*32\)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_give_the_intended_message(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_largest_seed_is_valid(tmp_path):
    validate(compose_cfg(["seed=4294967295", "task.sft.seed=4294967295", "task.eval.seed=0"], tmp_path))


UNKNOWN = [
    (["+task.train.lrr=1"], r"task.train.lrr is not a known key; did you mean task.train.lr\? \(keys under task.train: "
                            r".*global_batch_size.*\)"),
    (["+sed=1"], r"sed is not a known key; did you mean seed\? \(top-level keys: .*beta.*\)"),
    # a whole new sub-tree: the message names its root, not the leaf
    (["+task.trainn.lr=1"], r"task.trainn is not a known key; did you mean task.train\?"),
    (["beta=0.05", "+model.zzz_unrelated=1"], r"model.zzz_unrelated is not a known key \(keys under model: .*pretrained"),
]


@pytest.mark.parametrize("overrides,message", UNKNOWN, ids=[u[0][-1] for u in UNKNOWN])
def test_plus_override_of_an_unknown_key_names_the_closest_keys(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)  # Hydra itself accepts a `+key` it does not know
    with pytest.raises(ConfigError, match=message):
        validate(cfg, overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["+sweep=synthetic_small"],  # `+` on a config group (a new defaults entry), not a value
    ["+sweep=is_clip", "seed=1", "beta=0.05"],
    ["++task.train.lr=0.001"],  # `++` forces: override or add, on purpose
    ["task.train.lr=0.001"],
], ids=lambda v: " ".join(v))
def test_plus_on_a_group_and_plain_overrides_still_validate(overrides, tmp_path):
    validate(compose_cfg(overrides, tmp_path), overrides=overrides)


def test_launch_rejects_an_unknown_plus_key_before_running(tmp_path):
    env = {**os.environ, "ISDPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch.py"), *SMALL, "stage=sft", "+task.train.lrr=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "task.train.lrr is not a known key; did you mean task.train.lr?" in out, out[-3000:]
    assert not (tmp_path / "cache" / "sft").exists()  # stopped before any stage ran


def test_unknown_loss_choice_is_rejected_by_hydra_with_the_options():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_cfg(["loss=nope"])


def test_global_batch_is_fixed_across_hardware(tmp_path):
    from isdpo.trainer import accumulation

    for hw in group_options("hardware"):
        cfg = compose_cfg([f"hardware={hw}"], tmp_path)
        h = cfg.hardware
        acc = accumulation(cfg.task.train.global_batch_size, h.per_device_batch_size, h.devices, h.num_nodes)
        assert acc * h.per_device_batch_size * h.devices * h.num_nodes == cfg.task.train.global_batch_size


def test_run_dir_is_deterministic_from_overrides():
    a = compose_cfg(["loss=dpo", "beta=0.01"], run=False)
    b = compose_cfg(["beta=0.01", "loss=dpo", "logger=none"], run=False)
    assert a.hydra.run.dir == "outputs/default/" + a.hydra.job.override_dirname
    assert a.hydra.job.override_dirname == b.hydra.job.override_dirname == "beta=0.01,loss=dpo"


def test_long_overrides_give_a_short_deterministic_folder_name():
    from isdpo.resolvers import MAX_DIRNAME, run_dirname

    long = ",".join(f"task.some.key{i}=value{i}" for i in range(30))
    name = run_dirname(long)
    assert len(name) <= MAX_DIRNAME and name == run_dirname(long) and name != run_dirname(long + "x")
    assert run_dirname("beta=0.01,loss=dpo") == "beta=0.01,loss=dpo"
    # pinned: resume finds the folders that runs before the escaping of unsafe characters created
    assert name == ("task.some.key0=value0,task.some.key1=value1,task.some.key2=value2,task.some.key3=value3,"
                    "task.some.key4=valu~809cd516d40b")
    for plain in ("+size=resume", "model.name='a b,c'", "beta=0.01,loss=isdpo,seed=0", ""):
        assert run_dirname(plain) == plain


def test_a_slash_in_an_override_value_does_not_nest_the_run_folder():
    from isdpo.resolvers import run_dirname

    cfg = compose_cfg(["model.pretrained=/tmp/x/y", "beta=0.01"], run=False)
    assert cfg.hydra.run.dir == "outputs/default/beta=0.01,model.pretrained=%2Ftmp%2Fx%2Fy"
    assert Path(cfg.hydra.run.dir).parent == Path("outputs/default")
    assert run_dirname("a=x\x00y\nz") == "a=x%00y%0Az"
    # escaped, not replaced: different values keep different folders
    names = [run_dirname(f"a={v}") for v in ("x/y", "x_y", "x%2Fy", "x%y", "x%25y")]
    assert len(set(names)) == len(names) and not any("/" in n for n in names)
    long = run_dirname("model.pretrained=" + "/d" * 100)
    assert "/" not in long and long != run_dirname("model.pretrained=" + "%2Fd" * 100)
