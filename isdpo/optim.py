"""AdamW with linear warm-up and a cosine or constant schedule (the paper: cosine, 100 warm-up steps)."""
from __future__ import annotations

import math

import torch

from isdpo.schema import SCHEDULES



def warmup_schedule(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int, schedule: str,
                    fused: bool = False):
    """Lightning's ``configure_optimizers`` return value, stepping the scheduler per optimizer step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: warmup_schedule(s, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule),
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
