"""Where this process stands in its data-parallel job."""
from __future__ import annotations

import os

import torch.distributed as dist


def rank_world(*, launcher: bool = True) -> tuple[int, int]:
    """Global rank and world size of this process: the process group's once it exists, before that the
    launcher's environment (torchrun: RANK/WORLD_SIZE; Lightning's launcher: LOCAL_RANK/NODE_RANK/
    WORLD_SIZE in the ranks it starts, and in rank 0 once it has started them; srun: SLURM_PROCID/
    SLURM_NTASKS). Exact for rank 0; another rank of a multi-node Lightning launch gets some rank > 0.

    ``launcher=False``: the process group only (0, 1 before it exists): what data sharding must use, since
    Lightning's rank 0 learns of its world only when it starts the other ranks."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launcher:
        return 0, 1
    env = os.environ
    node = int(env.get("NODE_RANK") or 0)
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if env.get("LOCAL_RANK") and env.get("WORLD_SIZE"):
        local = int(env["LOCAL_RANK"])
        return local + node * int(env.get("LOCAL_WORLD_SIZE") or 1), int(env["WORLD_SIZE"])
    if env.get("SLURM_PROCID") and env.get("SLURM_NTASKS"):
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    if node > 0:  # a later node of a Lightning launch before its processes start: not rank 0
        return node, node + 1
    return 0, 1
