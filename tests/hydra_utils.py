"""Composing the project's config in tests the way launch.py does (with Hydra's own config)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from isdpo.resolvers import register
from isdpo.schema import store

register()
store(ConfigStore.instance())  # as launch.py: the schemas conf/ extends
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A reduced synthetic task: same code path, a few seconds instead of minutes.
SMALL = [
    "task.n_sft_sequences=512", "task.sft.epochs=1", "task.n_pref_prompts=256", "task.train.max_steps=8",
    "task.eval.every_n_steps=4", "task.eval.n_prompts=64", "hardware.per_device_batch_size=16",
    "task.train.global_batch_size=32", "logger=none",
]


def compose_cfg(overrides: list[str], tmp_path: Path | None = None, *, run: bool = True, cache_dir: Path | None = None):
    """The composed config; with ``tmp_path`` its output and cache dirs point there (the cache to ``cache_dir``
    when given: tests that build the same entries share one, conftest's ``shared_cache``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str((tmp_path or ROOT / "outputs") / "run")
        cfg.hydra.runtime.cwd = str(ROOT)
        HydraConfig.instance().set_config(cfg)
        if tmp_path is not None:
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(cache_dir or tmp_path / "cache")
        if not run:
            return cfg
        # launch.py's task function never sees the hydra node; ${hydra:...} resolves through HydraConfig.
        del cfg["hydra"]
    return cfg
