"""Labelled image pairs for change-detection fine-tuning, split by pair into train and val.

**Split.** Whole pairs are held out for validation (a seeded ``val_fraction`` of them), so no
validation pixel is ever seen in training; a single pair is cut into a top band for training
and a bottom band for validation (:func:`~geocmid.datasets.change_patches.split_regions`). Training
patches are drawn at random; validation patches tile the held-out pairs once.

**Normalisation** is ``(x - mean) / std`` with the encoder card's statistics (or the data's
when the encoder is randomly initialised), the same for both dates, applied on the device as
everywhere in TorchGeo. Nodata pixels are first set to the band mean, so the model sees 0
there: the neutral value the inference engine feeds (their labels are ignored anyway).

**Augmentation** flips and rotates both dates and the mask together. The two dates are stacked
on the channel axis for Kornia, because TorchGeo's change-detection data modules nest
``VideoSequential``, whose masks break under kornia 0.9 (``docs/data.md#deviations``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets.utils import Sample

from geocmid.datamodules.sharding import PerRankAugmentation, sharded_loader
from geocmid.datasets.change_patches import (
    ChangePatches,
    PairRegion,
    label_regions,
    split_regions,
)
from geocmid.datasets.pairs import PairRecord, align_pair, pair_statistics, read_pairs
from geocmid.errors import InputError
from geocmid.raster.stats import BandStats
from geocmid.samplers.shard import EpochIndexSampler, distributed
from geocmid.transforms.augment import fine_tuning_augmentations


class ChangeDataModule(PerRankAugmentation, NonGeoDataModule):
    """Labelled pairs (a CSV or a LEVIR-CD / SZTAKI folder) as change-detection batches.

    Batches hold ``image`` (B, 2, C, P, P), normalised, and ``mask`` (B, 1, P, P) with 1 for
    change, 0 for no change and 255 where there is no data, as
    :class:`torchgeo.tasks.ChangeDetection` expects. Every pair is opened and checked when the
    data module is created, so bad input fails before a model is built.

    Args:
        pairs: A pair list (see :func:`~geocmid.datasets.pairs.read_pairs`) or its records.
        bands: 1-based bands to read, the same for both dates; default all.
        mean: Per-band normalisation mean; default the training pairs' statistics.
        std: Per-band normalisation standard deviation; default as for ``mean``.
        patch_size: Side of the square patches in pixels.
        batch_size: Patches per batch.
        length: Training patches per epoch; default about the number of non-overlapping
            patches in the training pairs.
        num_workers: Data-loading worker processes.
        val_fraction: Share of the pairs (or, for one pair, of its rows) held out; 0 for none.
        nodata: Overrides or supplies the images' nodata value.
        seed: Seed of the split.

    Raises:
        InputError: A bad pair list, a missing file, a pair that cannot be aligned or
            labelled, pairs with different band counts, or bands out of range.
    """

    def __init__(
        self,
        pairs: str | os.PathLike[str] | Sequence[PairRecord],
        *,
        bands: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        patch_size: int = 256,
        batch_size: int = 8,
        length: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        nodata: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ChangePatches, batch_size=batch_size, num_workers=num_workers)
        records = read_pairs(pairs, labels=True) if isinstance(pairs, str | os.PathLike) else pairs
        self.regions = label_regions(records, nodata=nodata)
        count = self.regions[0].count
        for region in self.regions[1:]:
            if region.count != count:
                record = region.record
                raise InputError(
                    record.source or record.name,
                    f'{record.before} has {region.count} band(s), other pairs have {count}',
                )
        self.band_indexes = tuple(range(1, count + 1)) if bands is None else tuple(bands)
        if not self.band_indexes or not all(1 <= b <= count for b in self.band_indexes):
            raise InputError('--bands', f'{list(self.band_indexes)} not in 1..{count}')
        self.train_regions: list[PairRegion] = self.regions
        self.val_regions: list[PairRegion] = []
        if val_fraction != 0:
            self.train_regions, self.val_regions = split_regions(self.regions, val_fraction, seed)
        self.given_mean, self.given_std = mean, std
        self.patch_size = patch_size
        self.length = length or max(
            batch_size, sum(r.height * r.width for r in self.train_regions) // patch_size**2
        )
        self.nodata = nodata
        self.seed = seed
        self.val_fraction = val_fraction

    @property
    def in_channels(self) -> int:
        """Bands per image."""
        return len(self.band_indexes)

    def setup(self, stage: str) -> None:
        """Fix the normalisation and create the train and val patch sets.

        Args:
            stage: 'fit' or 'validate'.

        Raises:
            InputError: The given normalisation does not have one value per band.
        """
        # Resolved here, not in __init__, so that the data's statistics are only computed
        # (a pass over the pairs) when no encoder card supplies them.
        if self.given_mean is None or self.given_std is None:
            stats = self._statistics()
        for name, given in (('mean', self.given_mean), ('std', self.given_std)):
            if given is not None and len(given) != self.in_channels:
                count = f'{len(given)} value(s) for {self.in_channels} band(s)'
                raise InputError('encoder', f'normalisation {name} has {count}')
            values = given if given is not None else getattr(stats, name).tolist()
            setattr(self, name, torch.tensor(list(values), dtype=torch.float32))
        # Both dates share the statistics: stacked on the channel axis, they repeat.
        self.aug, self.train_aug = fine_tuning_augmentations(
            self.mean.repeat(2), self.std.repeat(2), rotate=True
        )
        if stage == 'fit':
            self.train_dataset = ChangePatches(
                self.train_regions, self.patch_size, self.band_indexes, length=self.length,
                nodata=self.nodata, seed=self.seed,
            )  # fmt: skip
        if stage in ('fit', 'validate') and self.val_regions:
            self.val_dataset = ChangePatches(
                self.val_regions, self.patch_size, self.band_indexes, nodata=self.nodata
            )

    def _dataloader_factory(self, split: str) -> DataLoader[Sample]:
        """This rank's share of ``split``.

        Training: fresh random patches per rank and epoch, ``length / world size`` per rank.
        Validation: every ``world_size``-th grid patch.
        """
        dataset = self._valid_attribute(f'{split}_dataset', 'dataset')
        sampler = None
        if split == 'train':
            rank, world_size = distributed(self.trainer)
            sampler = EpochIndexSampler(len(dataset), rank, world_size)
        return sharded_loader(self, split, dataset, sampler)

    def _statistics(self) -> BandStats:
        """Per-band statistics of the training pairs' valid pixels, both dates."""
        stats = BandStats.empty(self.in_channels)
        for region in self.train_regions:
            record = region.record
            with align_pair(
                record.before, record.after, nodata=self.nodata, allow_ungeoreferenced=True
            ) as pair:
                stats = stats.merge(pair_statistics(pair, self.band_indexes, rows=region.rows))
        if not stats.count.any():
            source = self.train_regions[0].record.source
            raise InputError(source, 'the training pairs hold no valid pixel')
        return stats

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """Fill nodata with the band mean, then normalise (and augment when training).

        Args:
            batch: A batch with ``image`` (B, 2, C, P, P), ``valid`` and ``mask``.
            dataloader_idx: Index of the data loader.

        Returns:
            The batch without ``valid`` (its information lives on in ``mask``).
        """
        valid = batch.pop('valid')
        image: Tensor = batch['image']
        mean = self.mean.to(image)[None, None, :, None, None]
        image = torch.where(valid[:, None, None], image, mean)
        batch['image'] = rearrange(image, 'b t c h w -> b (t c) h w')
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        batch['image'] = rearrange(batch['image'], 'b (t c) h w -> b t c h w', t=2)
        return batch
