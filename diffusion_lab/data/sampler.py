"""Shuffled training batches that resume mid-epoch exactly where they stopped.

Lightning saves and restores the state of a training ``DataLoader`` that has ``state_dict`` / ``load_state_dict``
(its "stateful dataloader" support) and then continues the epoch's batch counter. With a plain shuffled
``DataLoader`` the resumed epoch would instead start a fresh shuffle, and, since that shuffle draws from the
global RNG at a different moment, the whole remaining run would differ from an uninterrupted one.

Here the order of epoch ``e`` is a permutation drawn from a private generator seeded by (seed, e), so it is a
function of the epoch alone; the loader counts the batches it has handed out in the current epoch, and a resume
skips exactly those. The global RNG is never touched (the loader's worker base seed comes from a private generator
too), so the timesteps and noise the model draws after a resume are also those of an uninterrupted run.
Written here because torch's ``RandomSampler`` keeps no position and Lightning ships no resumable sampler.
"""

from __future__ import annotations

from typing import Any, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` per epoch, seeded by (seed, epoch); ``set_epoch`` as Lightning calls it."""

    def __init__(self, data: Sized, seed: int | None = None) -> None:
        self.n = len(data)
        # The process's base seed (seed_everything's under a seeded run): reading it draws nothing from the global
        # RNG, so building the loader after a resume's RNG restore does not shift the noise that follows.
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.epoch = 0
        self.start = 0  # indices of this epoch already used (set by a resume)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(int(mixed)))

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.permutation()[start:].tolist()

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A shuffling ``DataLoader`` whose ``state_dict`` is (seed, epoch, batches handed out this epoch).

    Lightning does not prefetch from a loader with a length, so the batches handed out are the batches trained on.
    """

    def __init__(self, dataset: Any, batch_size: int = 1, seed: int | None = None, **kwargs: Any) -> None:
        # Lightning re-creates the loader under DDP with sampler=<its distributed wrapper>, shuffle=False and
        # batch_sampler=None; the wrapper then decides the order (and a mid-epoch resume restarts that epoch's).
        kwargs.pop("shuffle", None)
        if kwargs.pop("batch_sampler", None) is not None:
            raise TypeError("ResumableDataLoader batches with its own sampler; drop batch_sampler")
        sampler = kwargs.pop("sampler", None)
        if sampler is None:
            sampler = EpochShuffle(dataset, seed)
        generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(getattr(sampler, "seed", 0))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)
        self.batches_handed_out = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._counting(super().__iter__())

    def _counting(self, batches: Iterator[Any]) -> Iterator[Any]:
        sampler = self.sampler
        self.batches_handed_out = sampler.start // self.batch_size if isinstance(sampler, EpochShuffle) else 0
        for batch in batches:
            self.batches_handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochShuffle):  # e.g. replaced by a DistributedSampler: nothing to resume
            return {}
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "batches": self.batches_handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state or not isinstance(self.sampler, EpochShuffle):
            return
        epoch, start = int(state["epoch"]), int(state["batches"]) * int(self.batch_size or 1)
        if start + (int(self.batch_size or 1) if self.drop_last else 1) > len(self.sampler):
            epoch, start = epoch + 1, 0  # saved on the epoch's last batch: the next epoch starts from its beginning
        self.sampler.seed, self.sampler.epoch, self.sampler.start = int(state["seed"]), epoch, start
