"""OmegaConf resolvers the configs use; registered by launch.py (and the tests) before composing."""
from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf

MAX_DIRNAME = 120  # well under the 255-byte file-name limit, with room for Hydra's own suffixes
# `/` would nest folders, NUL and control characters are invalid or unreadable in a file name; `%` is the
# escape character itself (so that escaping stays one-to-one: `a/b` -> `a%2Fb`, `a%2Fb` -> `a%252Fb`)
UNSAFE = re.compile(r"[%/\x00-\x1f\x7f]")


def gpus_per_node(accelerator, devices, cpu_value=None):
    """hydra/launcher/{slurm,local}.yaml: GPUs per node = hardware.devices on GPUs, ``cpu_value`` otherwise."""
    return int(devices) if str(accelerator) in ("gpu", "cuda") else cpu_value


def cpus_per_task(num_workers, torch_threads):
    """hydra/launcher/{slurm,local}.yaml: DataLoader workers + the main process's threads (1 when unset)."""
    return int(num_workers) + int(torch_threads or 1)


def run_dirname(override_dirname: str) -> str:
    """The run folder's name: the job's overrides with unsafe characters %-escaped (one path component), or,
    past MAX_DIRNAME characters, their start plus a hash of all of them (still deterministic from the
    overrides, so resume finds the folder)."""
    override_dirname = UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", override_dirname)
    if len(override_dirname) <= MAX_DIRNAME:
        return override_dirname
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:12]
    return f"{override_dirname[: MAX_DIRNAME - 13]}~{digest}"


def register() -> None:
    OmegaConf.register_new_resolver("isdpo.gpus", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("isdpo.cpus", cpus_per_task, replace=True)
    OmegaConf.register_new_resolver("isdpo.dirname", run_dirname, replace=True)
