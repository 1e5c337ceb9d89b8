"""A batch sampler whose global batches do not depend on the number of ranks.

`torch.utils.data.DistributedSampler` shuffles per rank count (rank r takes every world-th
index), so 1 rank and 2 ranks train on different batches and a run cannot be compared with, or
resumed on, a different world size. Here the order is global:

    epoch e: a seeded permutation of all indices (seed + e), cut into global batches of
             G = micro_batch_size * grad_accum * world_size (the tail that fills no batch is
             dropped); global batch g is optimizer step e * steps_per_epoch + g.
    rank r:  takes the r-th contiguous slice of G / world of each global batch and feeds it as
             grad_accum consecutive micro-batches of micro_batch_size.

So with G fixed, the micro-batches are the same set for any split between ranks and
accumulation (1 rank x accum 2 == 2 ranks x accum 1), and the loss/gradient averages match up to
float error. `start_at(step)` positions the sampler at an optimizer step (resume).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices), global batch by global batch.

    Use as `DataLoader(dataset, batch_sampler=sampler, collate_fn=...)`. One iteration covers the
    rest of the current epoch; a completed pass moves to the next epoch by itself.
    """

    def __init__(self, dataset_size: int, *, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int, seed: int, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset_size = dataset_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        # optimizer steps (global batches) in one pass over the data
        self.steps_per_epoch = dataset_size // self.global_batch_size
        self.epoch = 0
        self._skip = 0  # global batches of `epoch` to skip on the next iteration

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch`."""
        self.epoch, self._skip = epoch, 0

    def start_at(self, step: int) -> int:
        """Position the next iteration at optimizer step `step` (0 = the very start), i.e. at
        global batch step % steps_per_epoch of epoch step // steps_per_epoch. Returns the
        epoch."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.dataset_size} examples make no global batch of "
                             f"{self.global_batch_size}")
        self.epoch, self._skip = divmod(step, self.steps_per_epoch)
        return self.epoch

    def global_order(self, epoch: int) -> list[int]:
        """All dataset indices in the order of `epoch` (identical on every rank)."""
        if not self.shuffle:
            return list(range(self.dataset_size))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=gen).tolist()

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches, each the indices every rank together sees in one step."""
        order, g = self.global_order(epoch), self.global_batch_size
        return [order[i * g:(i + 1) * g] for i in range(self.steps_per_epoch)]

    def rank_slice(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch, in accumulation order."""
        per_rank = self.micro_batch_size * self.grad_accum
        mine = global_batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i * m:(i + 1) * m] for i in range(self.grad_accum)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, self._skip
        for global_batch in self.global_batches(epoch)[skip:]:
            yield from self.rank_slice(global_batch)
        # a full pass: the next iteration is the next epoch
        self.epoch, self._skip = epoch + 1, 0

    def __len__(self) -> int:
        """Micro-batches left in the current epoch on this rank."""
        return (self.steps_per_epoch - self._skip) * self.grad_accum
