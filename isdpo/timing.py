"""Where a run's time goes: wall-clock and CPU seconds per phase (result.json's ``timing`` block).

Every moment of a run is charged to the innermost open phase (``with TIMER.phase("evaluation")`` inside
``with TIMER.phase("train")`` takes the evaluation out of the training time); time in no phase is "other".
``startup`` is the time before the stage began: the interpreter, imports and Hydra's composition for the
first job of a process, the composition alone for the next jobs of a reused process (a joblib worker).
CPU seconds are this process's user + system time, all its threads (``time.process_time``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import psutil


def _now() -> tuple[float, float]:
    return time.time(), time.process_time()


class RunTimer:
    """Seconds per phase of the run in progress; one run at a time per process."""

    def __init__(self):
        # The first run's start-up begins with the process itself (its CPU clock starts at 0).
        self._origin = (psutil.Process().create_time(), 0.0)
        self.phases: dict[str, list[float]] = {}
        self._stack: list[str] = []
        self._mark = self._origin

    def start_run(self) -> None:
        """A stage begins: everything since the previous run ended (or the process started) is ``startup``."""
        now = _now()
        self.phases = {"startup": [now[0] - self._origin[0], now[1] - self._origin[1]]}
        self._stack, self._mark, self._start = [], now, now

    def end_run(self) -> dict:
        """The run is over: its report; the next run's start-up counts from here."""
        report = self.report()
        self._origin = _now()
        return report

    def _charge(self) -> None:
        now = _now()
        name = self._stack[-1] if self._stack else "other"
        acc = self.phases.setdefault(name, [0.0, 0.0])
        acc[0] += now[0] - self._mark[0]
        acc[1] += now[1] - self._mark[1]
        self._mark = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the block's time to ``name`` (exclusive of any phase opened inside it)."""
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def current(self) -> str | None:
        """The innermost open phase (None outside every phase)."""
        return self._stack[-1] if self._stack else None

    def report(self) -> dict:
        """``{phase: {"wall_s", "cpu_s"}}`` so far, with ``total`` (start-up included)."""
        if not hasattr(self, "_start"):
            return {}
        self._charge()
        out = {k: {"wall_s": round(w, 3), "cpu_s": round(c, 3)} for k, (w, c) in self.phases.items()}
        out["total"] = {"wall_s": round(sum(w for w, _ in self.phases.values()), 3),
                        "cpu_s": round(sum(c for _, c in self.phases.values()), 3)}
        return out


TIMER = RunTimer()
