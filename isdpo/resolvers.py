"""OmegaConf resolvers the configs use; registered by launch.py (and the tests) before composing."""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 120  # well under the 255-byte file-name limit, with room for Hydra's own suffixes


def gpus_per_node(accelerator, devices, cpu_value=None):
    """hydra/launcher/{slurm,local}.yaml: GPUs per node = hardware.devices on GPUs, ``cpu_value`` otherwise."""
    return int(devices) if str(accelerator) in ("gpu", "cuda") else cpu_value


def cpus_per_task(num_workers, torch_threads):
    """hydra/launcher/{slurm,local}.yaml: DataLoader workers + the main process's threads (1 when unset)."""
    return int(num_workers) + int(torch_threads or 1)


def run_dirname(override_dirname: str) -> str:
    """The run folder's name: the job's overrides, or, past MAX_DIRNAME characters, their start plus a
    hash of all of them (still deterministic from the overrides, so resume finds the folder)."""
    if len(override_dirname) <= MAX_DIRNAME:
        return override_dirname
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:12]
    return f"{override_dirname[: MAX_DIRNAME - 13]}~{digest}"


def register() -> None:
    OmegaConf.register_new_resolver("isdpo.gpus", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("isdpo.cpus", cpus_per_task, replace=True)
    OmegaConf.register_new_resolver("isdpo.dirname", run_dirname, replace=True)
