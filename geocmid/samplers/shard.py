"""Samplers that split a data set over DDP ranks by global rank.

Runs train with ``Trainer(use_distributed_sampler=False)``: every data module shards its own
loaders, so the samplers here are what each rank iterates.

* :class:`ShardedSampler`: every ``world_size``-th item of another sampler (or of the indices of
  a data set), from position ``rank``, without padding, for validation: every patch is
  evaluated exactly once over all ranks and the metrics are reduced across them.
* :class:`EpochIndexSampler`: fresh, disjoint indices per rank and epoch for data sets whose
  items are random draws keyed by their index (``ChangePatches`` in random mode).

Training over map-style data sets uses torch's own ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ('EpochIndexSampler', 'ShardedSampler', 'distributed')


def distributed(trainer: Any = None) -> tuple[int, int]:
    """(global rank, world size): from the trainer, else ``torch.distributed``, else (0, 1)."""
    if hasattr(trainer, 'world_size'):
        return int(trainer.global_rank), int(trainer.world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(Sampler[Any]):
    """This rank's share of another sampler: items ``rank``, ``rank + world_size``, ...

    Shares differ by at most one item; nothing is repeated to even them out, so metrics computed
    over all ranks count every item once.
    """

    def __init__(self, items: Iterable[Any] | int, rank: int, world_size: int) -> None:
        """Initialise a new ShardedSampler.

        Args:
            items: A sampler (or any sized iterable) to shard, or a data set length for indices.
            rank: This process's global rank.
            world_size: Number of ranks.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is not in [0, {world_size})')
        self.items = range(items) if isinstance(items, int) else items
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Any]:
        """Yield this rank's items in the order of the wrapped sampler."""
        for position, item in enumerate(self.items):
            if position % self.world_size == self.rank:
                yield item

    def __len__(self) -> int:
        """Items this rank yields."""
        assert isinstance(self.items, Sized)
        return max(0, math.ceil((len(self.items) - self.rank) / self.world_size))


class EpochIndexSampler(Sampler[int]):
    """Indices ``epoch * length + k`` for this rank's ``k``: new and disjoint every epoch.

    For data sets whose item ``i`` is a random draw seeded by ``i``: ranks then draw different
    items, a resumed or repeated run draws the same ones, and each rank's epoch holds
    ``length / world_size`` items. :meth:`set_epoch` is called by Lightning every epoch.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        """Initialise a new EpochIndexSampler.

        Args:
            length: Items per epoch over all ranks.
            rank: This process's global rank.
            world_size: Number of ranks.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is not in [0, {world_size})')
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices of the current epoch."""
        start = self.epoch * self.length
        return iter(range(start + self.rank, start + len(self) * self.world_size, self.world_size))

    def __len__(self) -> int:
        """Indices per rank: the epoch length divided by the world size (rounded down)."""
        return max(1, self.length // self.world_size)
