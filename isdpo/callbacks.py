"""The over-optimization curve: evaluate the policy every N optimizer steps and at the end."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from isdpo.evaluate import Evaluator
from isdpo.module import NonFiniteError, nonfinite_tensors


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class EvalCallback(L.Callback):
    """Runs ``evaluator`` at step 0, every ``every_n_steps`` optimizer steps and after the last one.

    Each point is appended to ``metrics_path`` (JSON lines: step, win_rate, kl,
    ...) and sent to the trainer's loggers under ``eval/``. On resume, points
    after the checkpoint's step are dropped first so the file equals that of an
    uninterrupted run. Only global rank zero evaluates.
    """

    def __init__(self, evaluator: Evaluator, metrics_path: str | Path, every_n_steps: int):
        self.evaluator = evaluator
        self.metrics_path = Path(metrics_path)
        self.every_n_steps = every_n_steps
        self.last_step: int | None = None

    def _evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if self.last_step == step or not trainer.is_global_zero:
            return
        self.last_step = step
        try:
            res = self.evaluator(pl_module.policy)
        except RuntimeError as err:
            # torch.multinomial's "probability tensor contains either `inf`, `nan` or element < 0".
            if "inf" not in str(err) or "nan" not in str(err):
                raise
            bad = nonfinite_tensors(dict(pl_module.policy.named_parameters()))
            why = (f"{len(bad)} parameter tensor(s) hold NaN/inf, e.g. {bad[0]}" if bad else "largest |weight| = "
                   f"{max(float(p.detach().abs().max()) for p in pl_module.policy.parameters()):.3g}")
            raise NonFiniteError(
                f"evaluation at step {step}: the policy's next-token probabilities are not finite ({why}): the "
                "weights diverged. Lower task.train.lr and/or set task.train.gradient_clip_val."
            ) from err
        res.pop("samples", None)
        row = {"step": step, "epoch": trainer.current_epoch, **res}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in res.items()}, step=step)

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            kept: list[dict] = []
            if trainer.global_step > 0:  # resumed: keep the points up to the checkpoint
                kept = [r for r in read_jsonl(self.metrics_path) if r["step"] <= trainer.global_step]
                if any(r["step"] == trainer.global_step for r in kept):
                    self.last_step = trainer.global_step
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if trainer.global_step == 0:  # a resumed run has its points up to the checkpoint already
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)
