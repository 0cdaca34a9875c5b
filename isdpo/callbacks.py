"""The over-optimization curve: evaluate the policy every N optimizer steps and at the end (the golden win
rate and KL of a task's evaluator, and the pair metrics on held-out pairs)."""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from isdpo.artifacts import read_jsonl, write_text
from isdpo.data.collate import PreferenceCollator
from isdpo.evaluate import Evaluator
from isdpo.logprobs import inference
from isdpo.losses import PairLogps
from isdpo.module import NonFiniteError, PreferenceModule, nonfinite_tensors
from isdpo.timing import TIMER
from isdpo.tracking import with_sqrt_kl
from isdpo.trainer import full_state_dict


class PairEvaluator:
    """TRL's evaluation metrics on held-out preference pairs: the training loss and its metrics (``loss``,
    ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``, ``is/*`` with importance
    sampling), computed by the module's own ``pair_logps`` and ``loss_fn`` in eval mode without gradients,
    over all ``pairs`` at once (so ``is/ess`` and the means are those of the whole set, not of a batch).

    The reference's log-probs are computed at the first call and then kept with the pairs: the reference is
    frozen. Nothing here draws from the random generators (the training run's stream is untouched).
    """

    def __init__(self, pairs: Sequence[dict], *, pad_id: int, batch_size: int):
        self.pairs = [dict(p) for p in pairs]
        self.collate = PreferenceCollator(pad_id)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self, module: PreferenceModule) -> dict:
        parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(PairLogps)}
        with inference(module.policy) as device:
            for start in range(0, len(self.pairs), self.batch_size):
                batch = self.collate(self.pairs[start:start + self.batch_size])
                lp = module.pair_logps({k: v.to(device) for k, v in batch.items()})
                for name in parts:
                    value = getattr(lp, name)
                    if value is not None:
                        parts[name].append(value.detach().float().cpu())
            out = module.loss_fn(PairLogps(**{k: torch.cat(v) if v else None for k, v in parts.items()}))
        if parts["ref_chosen"] and "chosen_ref_logp" not in self.pairs[0]:
            for p, c, r in zip(self.pairs, torch.cat(parts["ref_chosen"]).tolist(),
                               torch.cat(parts["ref_rejected"]).tolist()):
                p["chosen_ref_logp"], p["rejected_ref_logp"] = c, r
        return {"loss": float(out.loss), **{k: float(v) for k, v in out.metrics.items()}, "n_pairs": len(self.pairs)}


class EvalCallback(L.Callback):
    """Runs ``evaluator`` and ``pair_evaluator`` at step 0, every ``every_n_steps`` optimizer steps and after
    the last one (either may be None: a task without a golden reward has no evaluator).

    Each point is appended to ``metrics_path`` (JSON lines: step, win_rate, kl, ..., loss, rewards/accuracies,
    ...: the file holds evaluation points only, so its keys carry no ``eval/`` prefix) and sent to the
    trainer's loggers under ``eval/``. On resume, points after the checkpoint's step are dropped first (and a
    half-written last line a crash left), so the file equals that of an uninterrupted run; a point missing at the
    checkpoint's step is evaluated again. Only global rank zero evaluates.
    """

    def __init__(self, evaluator: Evaluator | None, metrics_path: str | Path, every_n_steps: int,
                 pair_evaluator: PairEvaluator | None = None):
        self.evaluator = evaluator
        self.pair_evaluator = pair_evaluator if pair_evaluator is not None and len(pair_evaluator) else None
        self.metrics_path = Path(metrics_path)
        self.every_n_steps = every_n_steps
        self.last_step: int | None = None
        # (step, the evaluator's result with its samples) of the latest point: stage=pipeline saves the final one
        # as stage=evaluate would, instead of evaluating the same policy again.
        self.last_evaluation: tuple[int, dict] | None = None
        self._whole = None  # rank zero's unsharded copy of the policy under FSDP
        self._started = False  # whether Lightning ran the train hooks (it skips them for a run resumed at its end)

    def setup(self, trainer, pl_module, stage):
        # Before the strategy wraps the model. Under FSDP each rank then holds a shard of every parameter, and
        # rank zero, evaluating alone outside FSDP's forward, evaluates this copy with the gathered weights.
        if trainer.is_global_zero and isinstance(trainer.strategy, FSDPStrategy):
            self._whole = copy.deepcopy(pl_module.policy)

    @contextmanager
    def _evaluated(self, pl_module, whole):
        """``pl_module`` with its policy whole for the block: under FSDP (``whole``: the gathered weights) the
        copy holding them stands in for the sharded policy."""
        if whole is None:
            yield
            return
        sharded = pl_module.policy
        self._whole.load_state_dict(whole)
        pl_module.policy = self._whole.to(pl_module.device)
        try:
            yield
        finally:
            pl_module.policy = sharded
            self._whole.to("cpu")  # the accelerator's memory is the sharded training's again

    def _evaluate(self, trainer: L.Trainer, pl_module) -> None:
        with TIMER.phase("evaluation"):
            self._evaluate_point(trainer, pl_module)

    def _evaluate_point(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if self.last_step == step:
            return
        self.last_step = step  # on every rank: under FSDP all take part in gathering the policy
        whole = full_state_dict(trainer)
        if not trainer.is_global_zero:
            return
        with self._evaluated(pl_module, whole):
            self._evaluate_policy(trainer, pl_module, step)

    def _evaluate_policy(self, trainer: L.Trainer, pl_module, step: int) -> None:
        try:
            res = self.evaluator(pl_module.policy) if self.evaluator is not None else {}
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
        if self.evaluator is not None:
            self.last_evaluation = (step, dict(res))
        res.pop("samples", None)
        if self.pair_evaluator is not None:
            # The training forward's precision (autocast under mixed precision), so the numbers compare.
            plugin = getattr(trainer, "precision_plugin", None)
            with plugin.forward_context() if plugin is not None else nullcontext():
                res.update(self.pair_evaluator(pl_module))
        row = {"step": step, "epoch": trainer.current_epoch, **res}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        # The loggers also get sqrt(KL), the x-axis of the paper's over-optimization figure (metrics.jsonl keeps
        # the measured values only).
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in with_sqrt_kl(res).items()}, step=step)

    def on_train_start(self, trainer, pl_module):
        self._started = True
        step = trainer.global_step
        kept: list[dict] = []
        if step > 0:  # resumed: keep the points up to the checkpoint (every rank reads them: see below)
            kept = [r for r in read_jsonl(self.metrics_path, torn_tail=True) if r["step"] <= step]
            # The checkpoint's step was evaluated before it was written; only a point lost since (a torn last line)
            # is evaluated again. Every rank decides alike: under FSDP evaluating is a collective.
            if any(r["step"] == step for r in kept) or not self._due(trainer, step):
                self.last_step = step
        if trainer.is_global_zero:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.last_step != step:  # a fresh run's step 0, or a resumed run's lost point
            self._evaluate(trainer, pl_module)

    def _due(self, trainer, step: int) -> bool:
        """Whether the curve has a point at ``step``: the start, every ``every_n_steps``, the last step."""
        last = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return step == 0 or (self.every_n_steps > 0 and step % self.every_n_steps == 0) or step >= last

    def finish(self, trainer, pl_module) -> None:
        """After ``fit``. Lightning runs no train hook for a run resumed at its last step (fit returns at once): its
        curve is cleaned here as on_train_start would (a torn last line, points past the checkpoint) and, with one
        process, its final point evaluated again if a crash lost it (several processes: isdpo.run_guard's final-point
        check says so)."""
        if self._started or not trainer.is_global_zero:
            return
        step = trainer.global_step
        text = self.metrics_path.read_text() if self.metrics_path.exists() else None
        kept = [r for r in read_jsonl(self.metrics_path, torn_tail=True) if r["step"] <= step]
        cleaned = "".join(json.dumps(r) + "\n" for r in kept)
        if text is not None and cleaned != text:
            write_text(self.metrics_path, cleaned)
        if (not kept or kept[-1]["step"] != step) and trainer.world_size == 1:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)
