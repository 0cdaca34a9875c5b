"""The tasks: registry and interface in :mod:`isdpo.tasks.base`; importing this package registers them all."""
from isdpo.tasks import preference, synthetic, text  # noqa: F401  (registration)
from isdpo.tasks.base import TASKS, Task, build_task, register

__all__ = ["TASKS", "Task", "build_task", "register"]
