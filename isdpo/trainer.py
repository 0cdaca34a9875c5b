"""Building the Lightning Trainer and logger from the config's hardware/train/logger blocks."""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
import torch
from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel,
                                    OptimStateKeyType, StateDictType)

from isdpo.artifacts import atomic_path
from isdpo.data.loader import LoaderProgress
from isdpo.module import check_finite_parameters
from isdpo.schema import LOGGERS, flatten
from isdpo.tracking import wandb_mode


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary sibling then renames it (isdpo.artifacts.atomic_path): a job killed mid-write never leaves
    a truncated last.ckpt, and a failed write (disk full, read-only) names the checkpoint and the cause.

    A checkpoint whose parameters hold NaN/inf is refused (NonFiniteError): resuming from it is useless
    and it would replace the last good one.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = str(path)
        check_finite_parameters(checkpoint.get("state_dict", {}), f"write checkpoint {path}")
        if get_filesystem(path).protocol not in ("file", ("file", "local")) and "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, str(tmp), storage_options)


class StepProgressBar(TQDMProgressBar):
    """One training bar over the whole run counting optimizer steps (``step N/total``), not micro-batches
    per epoch (with max_steps and no max_epochs Lightning's bar reads "Epoch 0/-2" and counts batches)."""

    def _description(self) -> str:
        total = self.trainer.estimated_stepping_batches
        return f"step {self.trainer.global_step}/{int(total) if math.isfinite(total) else '?'}"

    def init_train_tqdm(self) -> Tqdm:
        total = self.trainer.estimated_stepping_batches
        return Tqdm(desc=self._description(), initial=self.trainer.global_step,  # a resumed run continues
                    total=int(total) if math.isfinite(total) else None, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_):
        pass  # one bar for the run, not one per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.disable or bar.n == step:  # mid-accumulation: no optimizer step yet
            return
        if self.refresh_rate and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_description(self._description(), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar closes once, at on_train_end


class LineProgress(ProgressBar):
    """Training progress for a log (stdout is no terminal: a SLURM .out file, a joblib worker, a pipe): a line at
    each tenth of the run's optimizer steps, and at least one every ``every_s`` seconds (a slow run still shows it
    is alive), instead of a bar redrawn at every step (tqdm's carriage returns: hundreds of KB per run)."""

    def __init__(self, parts: int = 10, every_s: float = 300.0):
        super().__init__()
        self.parts, self.every_s, self._enabled = parts, every_s, True
        self._started = self._shown = 0.0
        self._first = self._step = self._part = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @staticmethod
    def _total(trainer) -> int | None:
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None

    def on_train_start(self, trainer, pl_module):
        self._started = self._shown = time.monotonic()
        self._first = self._step = trainer.global_step  # a resumed run's rate counts its own steps
        total = self._total(trainer)
        self._part = self._step * self.parts // total if total else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total, now = trainer.global_step, self._total(trainer), time.monotonic()
        if not self._enabled or step == self._step:  # mid-accumulation: no optimizer step yet
            return
        self._step = step
        part = step * self.parts // total if total else 0
        if part == self._part and now - self._shown < self.every_s and step != total:
            return
        self._part, self._shown = part, now
        rate = (step - self._first) / max(now - self._started, 1e-9)
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"]
        of = f"/{total} ({100 * step // total}%)" if total else ""
        print(f"[isdpo] step {step}{of}, {now - self._started:.0f} s, {rate:.3g} steps/s"
              + "".join(f", {m}" for m in shown), flush=True)


class StopPeersOnError(L.Callback):
    """When this process started the other data-parallel ranks (Lightning's subprocess launcher) and
    fails, stop them too, rather than leave them blocked in their next collective (gloo notices the
    closed connection, NCCL may wait for its timeout). Lightning itself does this only on Ctrl-C."""

    def on_exception(self, trainer, pl_module, exception):
        launcher = trainer.strategy.launcher
        if trainer.world_size > 1 and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signal.SIGKILL)


def accumulation(global_batch: int, per_device: int, devices: int, num_nodes: int,
                 keys: tuple[str, str] = ("task.train.global_batch_size", "hardware.per_device_batch_size")) -> int:
    """Gradient-accumulation steps that keep the global batch fixed across hardware. ``keys``: the config keys of
    the global and the per-device batch, named in the error."""
    world = per_device * devices * num_nodes
    if global_batch % world:
        raise ValueError(
            f"{keys[0]}={global_batch} is not a multiple of {keys[1]} x hardware.devices x hardware.num_nodes "
            f"= {per_device} x {devices} x {num_nodes} = {world}"
        )
    return global_batch // world


def build_logger(logger_cfg: Mapping[str, Any], *, run_dir: Path, run_name: str, group: str, job_type: str,
                 tags: list[str], run_id: str, config: Mapping[str, Any]):
    kind = logger_cfg["name"]
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version=job_type)
    if kind == "wandb":
        logger = WandbLogger(
            project=logger_cfg["project"], entity=logger_cfg.get("entity"), name=run_name, group=group,
            job_type=job_type, tags=tags, id=run_id, resume="allow", save_dir=str(run_dir),
            mode=wandb_mode(logger_cfg.get("mode", "auto")),
        )
        logger.log_hyperparams(flatten(config))
        return logger
    raise ValueError(f"logger.name={kind!r} is not known; allowed: {', '.join(LOGGERS)}")


def finish_logger(logger) -> None:
    """``wandb.finish()`` for a W&B logger, in a ``finally``: one failed job of a multirun must not hang the rest."""
    if logger and hasattr(logger, "experiment") and logger.__class__.__name__ == "WandbLogger":
        import wandb  # only when W&B is the logger

        try:
            wandb.finish()
        except Exception as err:  # noqa: BLE001
            # On a SLURM requeue every process of the job gets SIGTERM, W&B's service included; an error
            # here must not replace submitit's requeue exit (Hydra would mark the job failed).
            print(f"[isdpo] warning: wandb.finish() failed: {err}")


class SharedReferenceFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with two additions.

    - ``ignored_modules`` (the frozen reference) stay whole on every rank, on the rank's device: rank zero
      evaluates with the reference alone, outside FSDP's forward, which a sharded module cannot do (and
      Lightning moves nothing to the device under FSDP, so an ignored module would stay on the CPU).
    - CPU processes (gloo), so the sharded paths (saving, resuming, evaluating) are tested without a GPU.
      Out of the box neither library runs there: Lightning refuses any accelerator but CUDA ("The strategy
      `fsdp` requires a GPU accelerator"; its check matches the exact class, not a subclass) and FSDP without
      a ``device_id`` looks for an accelerator ("FSDP needs a non-CPU accelerator device"), so this wraps the
      model itself with ``device_id=cpu``. Full state dicts are then gathered without ``offload_to_cpu``:
      on a CPU device that option returns views of the gathered parameters that FSDP frees on exit, and
      reading them segfaults (torch 2.13).
    """

    def _setup_model(self, model):
        if self.root_device.type == "cpu" and not isinstance(model, FullyShardedDataParallel):
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                             **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning would warn it is unused
        model = super()._setup_model(model)
        for module in self.kwargs.get("ignored_modules") or ():
            module.to(self.root_device)
        return model

    def _full_state_context(self):
        return FullyShardedDataParallel.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

    def lightning_module_state_dict(self):
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer):
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        with self._full_state_context():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the checkpoint format Lightning's own FSDPStrategy writes
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def build_strategy(hw: Mapping[str, Any], model=None, frozen: Sequence[torch.nn.Module] = ()):
    """Lightning strategy from ``hardware``: FSDP wraps (and optionally checkpoints) the model's decoder layers
    and keeps the ``frozen`` modules (the reference) whole on every rank."""
    name = hw["strategy"]
    if name != "fsdp":
        return name
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = {type(m) for m in (model.modules() if model is not None else []) if type(m).__name__ in layer_names}
    frozen = [m for m in frozen if m is not None]
    return SharedReferenceFSDP(
        auto_wrap_policy=layers or None,
        activation_checkpointing_policy=layers if hw.get("activation_checkpointing") and layers else None,
        sharding_strategy="FULL_SHARD", state_dict_type="full", use_orig_params=True,
        **({"ignored_modules": frozen} if frozen else {}),
    )


def full_state_dict(trainer: L.Trainer, prefix: str = "policy.") -> dict[str, torch.Tensor] | None:
    """The whole (unsharded) state dict of the LightningModule's ``prefix`` submodule, keys without the prefix,
    on global rank zero ({} elsewhere), when the strategy shards the model; None when it does not (the
    module's own parameters are then whole). Under FSDP a collective: every rank must call it."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    state = trainer.strategy.lightning_module_state_dict()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_trainer(hw: Mapping[str, Any], *, max_steps: int, accumulate: int, run_dir: Path, logger,
                  callbacks: list, gradient_clip_val: float = 0.0, checkpoint_every_n_steps: int = 0,
                  fast_dev_run: bool = False, progress: bool = True, max_epochs: int | None = None,
                  model=None, frozen: Sequence[torch.nn.Module] = (), log_every_n_steps: int = 10) -> L.Trainer:
    """A Trainer; with ``checkpoint_every_n_steps`` > 0 it keeps an atomic ``checkpoints/last.ckpt``.
    ``model``/``frozen``: the trained model and the frozen modules beside it (FSDP's wrapping, see build_strategy).
    ``log_every_n_steps``: how often the loggers get the training metrics (the modules call ``self.log`` only then)."""
    # LoaderProgress must run before ModelCheckpoint (Lightning puts checkpoint callbacks last).
    callbacks = [LoaderProgress(), StopPeersOnError(), *callbacks]
    if progress:  # a bar on a terminal; in a log, a line per tenth of the run
        callbacks.append(StepProgressBar() if sys.stdout.isatty() else LineProgress())
    plugins = []
    if SLURMEnvironment.detect():
        # Requeue has one owner, submitit (hydra.launcher.max_num_timeout): it requeues the job with the
        # same overrides and the run resumes from last.ckpt. Lightning must not requeue it a second time.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if checkpoint_every_n_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                         every_n_train_steps=checkpoint_every_n_steps))
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(
        accelerator=hw["accelerator"], devices=hw["devices"], num_nodes=hw["num_nodes"],
        precision=hw["precision"], strategy=build_strategy(hw, model, frozen), max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else -1,
        accumulate_grad_batches=accumulate, gradient_clip_val=gradient_clip_val or None, logger=logger,
        callbacks=callbacks, plugins=plugins or None, enable_checkpointing=checkpoint_every_n_steps > 0,
        default_root_dir=str(run_dir), fast_dev_run=fast_dev_run, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=log_every_n_steps, num_sanity_val_steps=0, use_distributed_sampler=False,  # ResumableLoader shards by rank itself
    )
