"""A DataLoader that resumes mid-epoch exactly where it stopped.

Lightning restores a loader's position only if the loader is stateful; a plain
shuffled DataLoader restarts its epoch from a new order, so a resumed run would
see other batches than an uninterrupted one. Here the order of epoch ``e`` is a
seeded permutation (the same in every process and every restart), sharded over
the data-parallel ranks, and the loader's state is (epoch, batches consumed),
advanced by :class:`LoaderProgress` after each training batch.
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

    def indices(self) -> list[int]:
        """This rank's share of the epoch's order (before the resume skip)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.n)
        rank, world = rank_world(launcher=False)
        return order[: self.n // world * world][rank::world].tolist()

    def __iter__(self):
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return self.n // rank_world(launcher=False)[1]


class ResumableLoader(DataLoader):
    """DataLoader over a :class:`SeededSampler` with ``state_dict``/``load_state_dict`` for Lightning."""

    def __init__(self, dataset, *, batch_size: int, seed: int, shuffle: bool = True, **kwargs):
        self.seeded_sampler = SeededSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=self.seeded_sampler, drop_last=True, **kwargs)
        self.epoch, self.consumed = 0, 0

    def __iter__(self):
        self.seeded_sampler.epoch = self.epoch
        self.seeded_sampler.skip = self.consumed * self.batch_size
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
