"""A DataLoader that resumes mid-epoch exactly where it stopped.

Lightning restores a loader's position only if the loader is stateful; a plain
shuffled DataLoader restarts its epoch from a new order, so a resumed run would
see other batches than an uninterrupted one. Here the order of epoch ``e`` is a
seeded permutation (the same in every process and every restart), sharded over
the data-parallel ranks, and the loader's state is (epoch, batches consumed),
advanced by :class:`LoaderProgress` after each training batch.

An epoch holds whole optimizer steps only (``accumulate`` micro-batches each): Lightning steps the
optimizer at an epoch's end whatever it has accumulated, so a remainder would train as a smaller step.
:func:`plan_steps` says, before training, how many steps the data give and refuses a batch they cannot fill.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from isdpo.distributed import rank_world


class SeededSampler(Sampler[int]):
    """Epoch-seeded permutation, sharded by rank (equal shards), that can skip its first ``skip`` indices."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0
        self.stop: int | None = None  # this rank's indices end here (the last whole optimizer step)

    def indices(self) -> list[int]:
        """This rank's share of the epoch's order (before the resume skip)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        rank, world = rank_world(launcher=False)
        return order[: self.n // world * world][rank::world].tolist()

    def __iter__(self):
        return iter(self.indices()[self.skip : self.stop])

    def __len__(self) -> int:
        return self.n // rank_world(launcher=False)[1]


class ResumableLoader(DataLoader):
    """DataLoader over a :class:`SeededSampler` with ``state_dict``/``load_state_dict`` for Lightning; an epoch
    ends after its last whole group of ``accumulate`` micro-batches (one optimizer step each)."""

    def __init__(self, dataset, *, batch_size: int, seed: int, shuffle: bool = True, accumulate: int = 1, **kwargs):
        self.seeded_sampler = SeededSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=self.seeded_sampler, drop_last=True, **kwargs)
        self.epoch, self.consumed, self.accumulate = 0, 0, accumulate

    def __len__(self) -> int:
        return super().__len__() // self.accumulate * self.accumulate

    def __iter__(self):
        self.seeded_sampler.epoch = self.epoch
        self.seeded_sampler.skip = self.consumed * self.batch_size
        self.seeded_sampler.stop = len(self) * self.batch_size
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if self.consumed >= len(self):
            # Saved by the epoch's last batch: Lightning resumes in the next epoch, which starts from its beginning.
            self.epoch, self.consumed = self.epoch + 1, 0


class LoaderProgress(L.Callback):
    """Advances every ResumableLoader's state as training consumes batches (before checkpoints are written)."""

    @staticmethod
    def _loaders(trainer):
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return [dl for dl in loaders if isinstance(dl, ResumableLoader)]

    def on_train_batch_end(self, trainer, *args):
        for dl in self._loaders(trainer):
            dl.consumed += 1

    def on_train_epoch_end(self, trainer, *args):
        for dl in self._loaders(trainer):
            dl.epoch, dl.consumed = dl.epoch + 1, 0


class BatchMismatch(ValueError):
    """The data cannot fill the configured global batch: a step would train on fewer examples, or none would run."""


def plan_steps(n: int, global_batch: int, *, what: str, batch_key: str, max_steps: int | None = None,
               epochs: int | None = None, drop_remainder: bool = True, allow_key: str | None = None,
               unit: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) for ``n`` examples at ``global_batch`` per step, trained for
    ``max_steps`` or else ``epochs`` passes. Raises :class:`BatchMismatch` (with the numbers) when no whole step
    fits in the data, or when the run reaches an epoch's end with examples left over and ``drop_remainder`` is
    false (``allow_key``: the config key that allows skipping them; ``unit``: what the global batch must be a
    multiple of, for the suggested sizes)."""
    per_epoch, left = divmod(n, global_batch)
    if per_epoch == 0:
        raise BatchMismatch(
            f"{n} {what} are fewer than {batch_key}={global_batch}: not one step of {global_batch} fits in them. "
            f"Lower {batch_key} to at most {n // unit * unit or n} (and the per-device batch with it), or give "
            f"the run more data.")
    total = int(max_steps) if max_steps is not None else per_epoch * int(epochs or 1)
    reached = max_steps is None or total > per_epoch  # a run that stops within its first epoch never sees them
    if left and reached and not drop_remainder:
        fits = [b for b in range(unit, n + 1, unit) if n % b == 0]
        near = sorted(fits, key=lambda b: abs(b - global_batch))[:2]
        hint = f" (e.g. {' or '.join(map(str, sorted(near)))})" if near else ""
        raise BatchMismatch(
            f"{n} {what} are not a multiple of {batch_key}={global_batch}: each epoch is {per_epoch} step(s) of "
            f"{global_batch} and {left} left over, which would train as a smaller step or not at all. Use a global batch that "
            f"divides {n}{hint}, or set {allow_key}=true to skip the {left} left over in each epoch (each epoch "
            f"reshuffles: other ones are skipped each time).")
    if left and reached:
        print(f"[isdpo] {n} {what} = {per_epoch} steps of {global_batch} per epoch; the {left} left over in each "
              f"epoch are skipped")
    return per_epoch, total
