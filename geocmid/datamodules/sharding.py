"""Data loaders over one rank's share of a data set (see :mod:`geocmid.samplers.shard`)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from geocmid.samplers.shard import ShardedSampler, distributed
from geocmid.transforms.streams import RandomStreams, run_seed

__all__ = ('PerRankAugmentation', 'sharded_loader')


def sharded_loader(
    module: Any, split: str, dataset: Dataset[Any], train_sampler: Sampler[Any] | None = None
) -> DataLoader[Any]:
    """A TorchGeo data module's loader of ``split``, reading only this rank's share.

    Training shuffles with ``DistributedSampler`` (seeded by the run seed, reshuffled every
    epoch) unless ``train_sampler`` is given; other splits take every ``world_size``-th item
    (:class:`~geocmid.samplers.shard.ShardedSampler`), so each item is evaluated once.

    Args:
        module: The data module (its ``trainer``, ``batch_size``, ``num_workers`` and
            ``collate_fn`` are used).
        split: 'train', 'val', 'test' or 'predict'.
        dataset: The split's data set.
        train_sampler: Replaces the training sampler (it must shard by rank itself).

    Returns:
        The data loader.
    """
    rank, world_size = distributed(getattr(module, 'trainer', None))
    train = split == 'train'
    sampler: Sampler[Any]
    if train and train_sampler is not None:
        sampler = train_sampler
    elif train:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=run_seed()
        )
    else:
        # torch's Dataset declares no __len__; the map-style ones here all have one.
        sampler = ShardedSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=module.batch_size,
        sampler=sampler,
        num_workers=module.num_workers,
        collate_fn=module.collate_fn,
        drop_last=train,
        persistent_workers=module.num_workers > 0,
    )


class PerRankAugmentation:
    """Mixin for a TorchGeo data module: its batch augmentation draws from this rank's stream.

    Put it before the TorchGeo class (``class M(PerRankAugmentation, NonGeoDataModule)``). The
    stream is seeded with the run seed + global rank at the first batch, so DDP ranks flip and
    rotate their batches independently (:class:`~geocmid.transforms.streams.RandomStreams`).
    """

    trainer: Any

    @cached_property
    def streams(self) -> RandomStreams:
        """This rank's random stream."""
        streams = RandomStreams()
        streams.start(run_seed(), distributed(self.trainer)[0])
        return streams

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment (TorchGeo's ``aug``/``train_aug``) inside this rank's stream."""
        with self.streams(batch['image'].device):
            # A mixin: the data module class after it in the MRO defines the hook.
            return super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
