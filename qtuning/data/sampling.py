"""The training data order: fixed by (seed, epoch), split across processes, and resumable in the middle of an epoch.

Lightning saves a loader's `state_dict` in every checkpoint and hands it back on resume when the loader has one, so a
run killed at any step continues with exactly the batch it would have trained on next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """This process's share of one epoch of ``indices``.

    The order is a permutation drawn from ``seed + epoch`` alone (or the given order with ``shuffle=False``), so it
    does not depend on how often the loader was iterated before. Padded by repeating its head to a multiple of
    ``world`` (as `DistributedSampler`), then every ``world``-th index from ``rank``. `start` skips the first
    positions until a pass completes (a resumed epoch).
    """

    def __init__(
        self, indices: list[int], seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True
    ) -> None:
        order = list(indices)
        if shuffle:
            permutation = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed + epoch))
            order = [order[i] for i in permutation.tolist()]
        padding = -len(order) % world
        order += (order * (padding // max(1, len(order)) + 1))[:padding]
        self.share = order[rank::world]
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        # Lightning may create an iterator more than once before consuming one: the skip holds until a pass ends
        yield from self.share[self.start :]
        self.start = 0

    def __len__(self) -> int:
        return len(self.share)


class ResumableLoader(DataLoader):
    """A `DataLoader` over an `EpochSampler` whose position Lightning checkpoints.

    ``position()`` gives the micro-batches of this epoch trained so far when a checkpoint is written; on resume, the
    sampler skips that many batches' worth of samples, if the checkpoint was written in this loader's epoch.
    """

    def __init__(self, *args: Any, epoch: int, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = epoch
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.position()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("epoch") == self.epoch:
            self.sampler.start = state["batches"] * self.batch_size
