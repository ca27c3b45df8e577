"""Image + label patches for segmentation fine-tuning, split into spatial train/val blocks.

**Split.** The labelled area is cut into square blocks of ``block_size`` pixels (a multiple
of the patch size) anchored at the top-left corner of the rasters' extent. A seeded random
``val_fraction`` of the blocks is held out for validation, chosen among the blocks that lie
wholly inside the scenes. Neighbouring pixels are strongly correlated, so a random pixel or
patch split would leak: here validation patches tile the held-out blocks exactly
(:class:`~torchgeo.samplers.GriddedPatchSampler`) and training patches are drawn only from
the area outside them (:class:`~geocmid.samplers.valid_patch.ValidPatchSampler` keeps patches
wholly inside its region), so no validation pixel is ever seen in training.

**Normalisation** is ``(x - mean) / std`` with the encoder card's statistics (or the data's
when the encoder is randomly initialised), applied on the device as everywhere in TorchGeo.
Nodata pixels are first set to the band mean, so the model sees 0 there: the same neutral
value the inference engine feeds (their labels are ignored anyway).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import shapely
import torch
from shapely.geometry.base import BaseGeometry
from torch import Tensor
from torchgeo.datamodules import GeoDataModule
from torchgeo.datasets.utils import Sample
from torchgeo.samplers import GriddedPatchSampler

from geocmid.datamodules.sharding import PerRankAugmentation
from geocmid.datasets.geo_raster import DEVICE_READ, GeoRasterDataset, restore_on_device
from geocmid.datasets.labels import IGNORE_INDEX, LabelledDataset, open_labels
from geocmid.errors import InputError
from geocmid.raster.files import BandSelection
from geocmid.samplers.shard import ShardedSampler, distributed
from geocmid.samplers.valid_patch import ValidPatchSampler
from geocmid.transforms.augment import fine_tuning_augmentations

#: Default block side of the spatial split, in patches (see ``block_size``).
BLOCK_PATCHES = 4


class SegmentationDataModule(PerRankAugmentation, GeoDataModule):
    """Rasters and their labels, split into spatial train/val blocks (see the module docstring).

    The rasters and labels are opened and checked, and the split is planned, when the data
    module is created, so bad input fails before a model is built and :attr:`in_channels`
    and :attr:`class_names` are known up front. ``mean`` and ``std`` are fixed in
    :meth:`setup`.
    """

    def __init__(
        self,
        rasters: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        labels: str | os.PathLike[str],
        *,
        label_field: str | None = None,
        class_names: Sequence[str] | None = None,
        bands: BandSelection | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        patch_size: int = 256,
        batch_size: int = 8,
        length: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        block_size: int | None = None,
        max_nodata_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        """Open the rasters and labels and plan the split.

        Args:
            rasters: A raster, a folder of rasters, or several of either.
            labels: Vector labels or label rasters (see :mod:`geocmid.datasets.labels`).
            label_field: Class attribute of vector labels.
            class_names: Class names in id order.
            bands: Bands to read (1-based indexes or names); default all.
            mean: Per-band normalisation mean; default the data's statistics.
            std: Per-band normalisation standard deviation; default the data's statistics.
            patch_size: Side of the square training and validation patches, in pixels.
            batch_size: Patches per batch.
            length: Training patches per epoch; default about the number of non-overlapping
                patches in the training area.
            num_workers: Data-loading worker processes.
            val_fraction: Share of the blocks held out for validation; 0 disables validation.
            block_size: Side of the split blocks in pixels, a multiple of ``patch_size``;
                default 4 patches, fewer when the rasters' extent would hold under 4 blocks.
            max_nodata_fraction: Largest share of nodata pixels in a training patch.
            seed: Seed of the block assignment and of the training patches.

        Raises:
            InputError: Unreadable or ungeoreferenced rasters, bad labels, a scene without
                labels, normalisation of the wrong length, or an area too small to split.
        """
        super().__init__(
            GeoRasterDataset,
            batch_size=batch_size,
            patch_size=patch_size,
            length=length,
            num_workers=num_workers,
        )
        self.patch_size: int = patch_size  # square patches only (torchgeo also takes (h, w))
        if not 0 <= val_fraction < 1:
            raise InputError('val_fraction', f'must be in [0, 1), got {val_fraction}')
        self.images = GeoRasterDataset(
            rasters, bands=bands, max_nodata_fraction=max_nodata_fraction, **DEVICE_READ
        )
        opened = open_labels(
            labels, self.images.crs, label_field=label_field, class_names=class_names
        )
        self.dataset: LabelledDataset = LabelledDataset(self.images, opened)
        self.given_mean, self.given_std = mean, std
        self.seed = seed
        self.val_fraction = val_fraction
        self.block_size = block_size or self._default_block_size()
        self.train_roi, self.val_roi = self._split()

    @property
    def in_channels(self) -> int:
        """Number of image bands."""
        return len(self.images.band_indexes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in id order."""
        return self.dataset.class_names

    def setup(self, stage: str) -> None:
        """Fix the normalisation and create the samplers of the train and val blocks.

        Args:
            stage: Either 'fit' or 'validate' (testing and prediction are not offered here;
                whole-scene prediction goes through :mod:`geocmid.inference`).

        Raises:
            InputError: The given normalisation does not have one value per band.
        """
        # Resolved here, not in __init__, so that the data's statistics are only computed
        # (a pass over the rasters) when no encoder card supplies them.
        self.mean = _statistic('mean', self.given_mean, self.images)
        self.std = _statistic('std', self.given_std, self.images)
        self.aug, self.train_aug = fine_tuning_augmentations(self.mean, self.std, rotate=False)
        self.train_dataset = self.val_dataset = self.dataset
        # Every rank reads its own share: disjoint training patches (length / world size per
        # rank) and every world_size-th validation patch.
        rank, world_size = distributed(self.trainer)
        if stage == 'fit':
            self.train_sampler = ValidPatchSampler(
                self.images,
                size=self.patch_size,
                length=self.length,
                roi=self.train_roi,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
            )
        if stage in ('fit', 'validate') and self.val_roi is not None:
            grid = GriddedPatchSampler(
                self.dataset, size=self.patch_size, stride=self.patch_size, roi=self.val_roi
            )
            # torchgeo types val_sampler as a GeoSampler; its loader takes any Sampler.
            self.val_sampler = ShardedSampler(grid, rank, world_size)  # type: ignore[assignment]

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """Fill nodata with the band mean, then normalise (and augment when training).

        Args:
            batch: A batch with ``image``, ``valid`` and ``mask``.
            dataloader_idx: Index of the data loader.

        Returns:
            The batch without ``valid`` (its information lives on in ``mask``).
        """
        batch = restore_on_device(batch, self.images.sentinel, IGNORE_INDEX)
        valid = batch.pop('valid')
        mean = self.mean.to(batch['image'])[None, :, None, None]
        batch['image'] = torch.where(valid[:, None], batch['image'], mean)
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def _default_block_size(self) -> int:
        """:data:`BLOCK_PATCHES` patches, or fewer where the area would hold under 4 blocks."""
        left, bottom, right, top = self.images.index.total_bounds
        xres, yres = self.images.res
        for patches in range(BLOCK_PATCHES, 1, -1):
            side = patches * self.patch_size
            if (right - left) / xres // side * ((top - bottom) / yres // side) >= 4:
                return side
        return self.patch_size

    def _split(self) -> tuple[BaseGeometry, BaseGeometry | None]:
        """Train and val regions: seeded random whole blocks inside the scenes are held out."""
        footprint = self.images.index.geometry.union_all()
        if self.val_fraction == 0:
            return footprint, None
        if self.block_size % self.patch_size:
            raise InputError(
                'block_size', f'{self.block_size} px is not a multiple of the patch size'
            )
        xres, yres = self.images.res
        left, bottom, right, top = self.images.index.total_bounds
        side_x, side_y = self.block_size * xres, self.block_size * yres
        # Block corners in row-major order from the top-left; the epsilon keeps an extent
        # that is a whole number of blocks from gaining an empty row or column.
        x = left + side_x * np.arange(math.ceil((right - left) / side_x - 1e-9))
        y = top - side_y * np.arange(1, math.ceil((top - bottom) / side_y - 1e-9) + 1)
        xmin, ymin = (corner.ravel() for corner in np.meshgrid(x, y))
        blocks = shapely.box(xmin, ymin, xmin + side_x, ymin + side_y)
        blocks = blocks[shapely.area(shapely.intersection(blocks, footprint)) > 0]
        # Validation blocks must lie wholly inside the scenes for their patch grid to be
        # exact; the quarter-pixel shrink absorbs float noise on shared edges.
        inside = np.flatnonzero(shapely.within(_shrink(blocks, 0.25, xres), footprint))
        count = min(len(inside), len(blocks) - 1, max(1, round(self.val_fraction * len(blocks))))
        if count < 1:
            raise InputError(
                self.images.roots[0],
                f'cannot hold out a {self.block_size} px validation block and keep training '
                f'data ({len(blocks)} block(s), {len(inside)} inside the scenes); lower the '
                'patch or block size',
            )
        chosen = np.random.default_rng(self.seed).choice(inside, count, replace=False)
        held_out = blocks[np.sort(chosen)]
        train = footprint.difference(shapely.union_all(held_out))
        if train.area < (self.patch_size * xres) * (self.patch_size * yres):
            raise InputError(
                self.images.roots[0],
                f'no room for {self.patch_size} px training patches beside the validation '
                'blocks (lower the patch size, the block size or val_fraction)',
            )
        # Shrunk by half a pixel, the blocks' bounds span whole patches less one pixel, so
        # GriddedPatchSampler centres its grid exactly on them and keeps only the patches
        # inside them (a neighbouring patch stays half a pixel away).
        return train, shapely.union_all(_shrink(held_out, 0.5, xres))


def _shrink(boxes: np.ndarray, pixels: float, res: float) -> np.ndarray:
    """Boxes shrunk on every side by ``pixels`` pixels of size ``res``."""
    return shapely.buffer(boxes, -pixels * res, join_style='mitre')


def _statistic(name: str, values: Sequence[float] | None, images: GeoRasterDataset) -> Tensor:
    """A per-band normalisation vector: given (checked against the band count) or the data's."""
    if values is None:
        return getattr(images, name)
    if len(values) != len(images.band_indexes):
        raise InputError(
            images.roots[0],
            f'normalisation {name} has {len(values)} value(s) for '
            f'{len(images.band_indexes)} band(s)',
        )
    return torch.tensor(list(values), dtype=torch.float32)
