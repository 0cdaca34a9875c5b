"""Every sweep in sweeps/ composes, and so does every job of its grid: a sweep file cannot drift from the
config groups, and sweeps/README.md's run counts cannot drift from the files.

`launch.py -m +sweep=NAME` finds sweeps/NAME.yaml through the symlink conf/sweep -> ../sweeps.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from isdpo.config import validate
from isdpo.tasks import TASKS
from tests.hydra_utils import CONF, ROOT

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
README = (ROOT / "sweeps" / "README.md").read_text()


def _register_launch_resolvers() -> None:
    """The ``isdpo.*`` resolvers that conf/config.yaml and hydra/launcher/{slurm,local}.yaml use (as launch.py)."""
    from isdpo.resolvers import register

    register()


def hydra_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def grid(name: str) -> dict[str, list]:
    """``hydra.sweeper.params`` parsed the way Hydra's sweeper parses it: key -> list of values."""
    params = hydra_cfg([f"+sweep={name}"]).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.key_or_group: list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for o in parsed}


def test_sweeps_exist_and_conf_sweep_points_at_them():
    assert {"tldr_overopt", "hh_overopt", "is_clip", "synthetic_small"} <= set(SWEEPS)
    assert sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")) == SWEEPS


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_with_its_grid(name):
    text = (ROOT / "sweeps" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), "a sweep sets top-level keys and hydra.*"
    cfg = hydra_cfg([f"+sweep={name}"])
    assert cfg.experiment == name  # W&B group and multirun/<name>/
    assert cfg.hydra.sweep.dir == f"multirun/{name}"
    params = grid(name)
    assert params and all(values for values in params.values())
    # sweeps/README.md: a table row per sweep, whose run count is the size of the grid
    row = re.search(rf"^\| `{name}` \|[^|]*\| (\d+) \|", README, re.M)
    assert row, f"sweeps/README.md has no table row for `{name}`"
    assert int(row.group(1)) == math.prod(len(v) for v in params.values())


@pytest.mark.parametrize("name", SWEEPS)
def test_every_grid_value_composes_into_a_valid_job(name, tmp_path):
    """One job per grid value (each value with the others at the file's defaults), composed as the job
    itself composes (+sweep=NAME plus its overrides); every interpolation resolves; validated where the
    task is implemented."""
    params = grid(name)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for key, values in params.items():
            for value in values:
                override = f"{key}={value}"
                job = compose("config", overrides=[f"+sweep={name}", override], return_hydra_config=True)
                # its folder: multirun/<name>/<key=value> (the sweep itself is excluded from the name)
                assert job.hydra.job.override_dirname == override
                parsed = OmegaConf.create({"v": None if value == "null" else value}).v
                got = job[key].name if key in job.hydra.runtime.choices else OmegaConf.select(job, key)
                assert str(got) == str(parsed), (key, value, got)
                with open_dict(job):  # as launch.py's job sees it (tests/hydra_utils.py: compose_cfg)
                    job.hydra.runtime.output_dir = str(tmp_path / "run")
                    job.hydra.runtime.cwd = str(ROOT)
                HydraConfig.instance().set_config(job)
                cfg = OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])
                OmegaConf.to_container(cfg, resolve=True)
                if cfg.task.name in TASKS:
                    validate(cfg)


@pytest.mark.parametrize("name", SWEEPS)
def test_slurm_resources_follow_the_sweeps_hardware(name):
    _register_launch_resolvers()
    cfg = hydra_cfg([f"+sweep={name}", "hydra/launcher=slurm"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    hw = cfg.hardware
    assert launcher["nodes"] == hw.num_nodes
    assert launcher["tasks_per_node"] == hw.devices
    assert launcher["gpus_per_node"] == (hw.devices if hw.accelerator in ("gpu", "cuda") else None)
    assert launcher["cpus_per_task"] == hw.num_workers + (hw.torch_threads or 1)
    assert launcher["name"] == name and launcher["submitit_folder"] == f"multirun/{name}/.submitit/%j"
    assert launcher["max_num_timeout"] >= 1  # submitit owns requeue (isdpo/trainer.py: Lightning's is off)


def test_local_launcher_resolves():
    _register_launch_resolvers()
    for hardware, gpus in (("cpu", 0), ("gpu1", 1)):
        cfg = hydra_cfg(["hydra/launcher=local", f"hardware={hardware}"])
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (gpus, 1, 1)
