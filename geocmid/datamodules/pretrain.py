"""Patches for self-supervised pretraining, from georeferenced rasters or from image chips.

* ``rasters``: random square patches from a :class:`~geocmid.datasets.geo_raster.GeoRasterDataset`
  through the nodata-aware, rank-sharded :class:`~geocmid.samplers.valid_patch.ValidPatchSampler`.
* ``images``: one random square patch per chip of a :class:`~geocmid.datasets.chips.ChipFolder`
  per epoch; chips smaller than the patch are first resized (shorter side to the patch size).

Both are opened and checked when the data module is created, so bad input fails before a model
is built, and the band names, statistics and epoch length are known up front (the task records
them). Raster patches leave the host in the rasters' own dtype, with their validity left out
where the nodata value implies it (:data:`RASTER_OPTIONS`). Batches are cast and normalised on
the device after the transfer: ``valid`` is rebuilt there when needed, nodata pixels are
normalised to 0 (the band mean), and ``valid`` stays in the batch so that the task can leave
them out of its losses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from torchgeo.datamodules import BaseDataModule
from torchgeo.datasets import stack_samples
from torchgeo.datasets.utils import Sample
from torchvision.transforms.v2 import functional as F

from geocmid.datasets.chips import ChipFolder, chip_statistics
from geocmid.datasets.geo_raster import DEVICE_READ, GeoRasterDataset, restore_on_device
from geocmid.errors import InputError
from geocmid.raster.bands import RGB_BAND_NAMES
from geocmid.raster.files import BandSelection, crs_name
from geocmid.raster.normalise import normalise
from geocmid.samplers.valid_patch import ValidPatchSampler

#: How pretraining reads raster patches (bench/loader.py measures this very setting): in the
#: files' dtype, a quarter of the bytes of float32 for 8-bit imagery to collate, pin and copy
#: to the GPU, and without the validity mask when the nodata value implies it; both are
#: restored on the device by :meth:`PretrainDataModule.on_after_batch_transfer`.
RASTER_OPTIONS: dict[str, Any] = DEVICE_READ


class RandomSquarePatch:
    """Cut a random ``size`` x ``size`` patch from a chip's image, selecting bands first.

    A chip smaller than ``size`` on either side is first resized (bilinear, antialiased) so that
    its shorter side is ``size``, keeping its aspect ratio.
    """

    def __init__(self, size: int, band_indices: tuple[int, ...]) -> None:
        """Initialise the transform.

        Args:
            size: Side of the patch in pixels.
            band_indices: 1-based bands to keep, in order.
        """
        self.size = size
        self.channels = [index - 1 for index in band_indices]

    def __call__(self, sample: Sample) -> Sample:
        """Replace ``sample['image']`` by a random patch of it."""
        image = sample['image'][self.channels]
        if min(image.shape[-2:]) < self.size:
            image = F.resize(image, [self.size], antialias=True)
        height, width = image.shape[-2:]
        # torch's global generator: seeded per data-loader worker by Lightning's seed_everything.
        top = int(torch.randint(height - self.size + 1, ()))
        left = int(torch.randint(width - self.size + 1, ()))
        return {'image': image[:, top : top + self.size, left : left + self.size]}


class PretrainDataModule(BaseDataModule):
    """Square patches for pretraining, from ``rasters`` or from ``images`` (see module docstring).

    Attributes:
        band_names: Name of each band used.
        band_indices: 1-based index of each band used in the source files.
        mean: Per-band mean of the data, float32 (C,), in raw units.
        std: Per-band standard deviation, float32 (C,), in raw units.
        max_value: Raw value of full scale (the dtype's maximum for integer rasters; 255 for
            chips and 1 for float rasters), which relates 8-bit augmentation constants to the data.
        resolution: Ground resolution in metres per pixel, or None for chips.
        samples_per_epoch: Patches per epoch over all devices.
        sentinel: Value marking the invalid pixels of raster patches, from which ``valid`` is
            rebuilt on the device (see :attr:`GeoRasterDataset.sentinel`); None for chips.
    """

    dataset: GeoRasterDataset | ChipFolder  # set by __init__, whichever the source

    def __init__(
        self,
        *,
        rasters: str | os.PathLike[str] | None = None,
        images: str | os.PathLike[str] | None = None,
        bands: BandSelection | None = None,
        patch_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        max_nodata_fraction: float = 0.5,
        nodata: float | None = None,
        seed: int = 0,
    ) -> None:
        """Open and check the data.

        Args:
            rasters: A raster or a folder of rasters (searched recursively).
            images: A folder of image chips, instead of ``rasters``.
            bands: Bands to use: 1-based indices, or band names (rasters with band descriptions).
            patch_size: Side of the square patches in pixels.
            batch_size: Patches per device per step.
            num_workers: Data-loading worker processes per device.
            samples_per_epoch: Patches per epoch over all devices (default: rasters, about the
                non-overlapping patches in the valid area; chips, one per chip).
            max_nodata_fraction: Largest share of nodata pixels in a raster patch.
            nodata: Nodata value overriding the rasters' own.
            seed: Seed of the patch sampler.

        Raises:
            InputError: Not exactly one of ``rasters`` and ``images``; missing, empty or
                unreadable data; bands not in the data; a patch larger than every raster; or
                no patch with few enough nodata pixels.
        """
        super().__init__(GeoRasterDataset, batch_size=batch_size, num_workers=num_workers)
        if (rasters is None) == (images is None):
            raise InputError('--rasters/--images', 'give exactly one of them')
        if patch_size < 1:
            raise InputError('--patch-size', f'must be a positive pixel count, got {patch_size}')
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise InputError('--samples-per-epoch', f'must be positive, got {samples_per_epoch}')
        self.patch_size = patch_size
        self.seed = seed
        self.sampler: Sampler[Any] | None = None
        self.sentinel: float | None = None
        #: (epoch, batches trained on) of the checkpoint resumed from, until the loader is built.
        self._resume_at: tuple[int, int] | None = None
        self.crs: str | None = None
        if rasters is not None:
            self.source, self.root = 'rasters', os.fspath(rasters)
            self._open_rasters(rasters, bands, samples_per_epoch, max_nodata_fraction, nodata)
        elif images is not None:
            self.source, self.root = 'images', os.fspath(images)
            self._open_chips(images, bands, samples_per_epoch)

    @property
    def in_channels(self) -> int:
        """Number of bands the patches have."""
        return len(self.band_names)

    def _open_rasters(
        self,
        paths: str | os.PathLike[str],
        bands: BandSelection | None,
        samples_per_epoch: int | None,
        max_nodata_fraction: float,
        nodata: float | None,
    ) -> None:
        dataset = GeoRasterDataset(
            paths,
            bands=bands,
            nodata=nodata,
            max_nodata_fraction=max_nodata_fraction,
            **RASTER_OPTIONS,
        )
        # Built once here (world size 1) to check that patches fit and to learn the default
        # epoch length; setup() shards it when training on several devices.
        sampler = ValidPatchSampler(
            dataset,
            size=self.patch_size,
            length=samples_per_epoch,
            seed=self.seed,
            rank=0,
            world_size=1,
        )
        self.dataset = self.train_dataset = dataset
        self.sampler = sampler
        self.collate_fn = stack_samples
        self.band_names = list(dataset.band_names)
        self.band_indices = list(dataset.band_indexes)
        self.mean, self.std = dataset.mean, dataset.std
        dtypes = {dtype for source in dataset.sources for dtype in source.dtypes}
        self.max_value = max(_full_scale(dtype) for dtype in dtypes)
        self.resolution: float | None = dataset.ground_resolution
        self.samples_per_epoch = len(sampler)
        self.crs = crs_name(dataset.target_crs)
        self.sentinel = dataset.sentinel

    def _open_chips(
        self,
        root: str | os.PathLike[str],
        bands: BandSelection | None,
        samples_per_epoch: int | None,
    ) -> None:
        chips = ChipFolder(root)
        self.band_indices = _chip_bands(root, chips.num_bands, bands)
        channels = [index - 1 for index in self.band_indices]
        # Statistics over whole chips, before the random patches are switched on.
        stats = chip_statistics(chips)
        std = stats.std[channels]
        self.mean = torch.tensor(stats.mean[channels], dtype=torch.float32)
        # A constant band is only centred, as for rasters.
        self.std = torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32)
        chips.transforms = RandomSquarePatch(self.patch_size, tuple(self.band_indices))
        self.dataset = self.train_dataset = chips
        self.collate_fn = stack_samples
        if chips.num_bands == 3 and all(
            path.suffix.lower() not in ('.tif', '.tiff') for path in chips.files
        ):
            names = [RGB_BAND_NAMES[index - 1] for index in self.band_indices]  # PIL decodes RGB
        else:
            names = [f'band_{index}' for index in self.band_indices]
        self.band_names = names
        self.max_value = 255.0
        self.resolution = None
        self.samples_per_epoch = samples_per_epoch or len(chips)
        self.crs = None

    def summary(self) -> dict[str, Any]:
        """What the model card records about the training data."""
        summary: dict[str, Any] = {
            'source': self.source,
            'path': self.root,
            'bands': self.band_names,
            'samples_per_epoch': self.samples_per_epoch,
            'patch_size': self.patch_size,
        }
        if isinstance(self.dataset, GeoRasterDataset):
            summary |= {
                'files': len(self.dataset.files),
                'crs': self.crs,
                'resolution': list(self.dataset.res),
                'nodata': self.dataset.nodata,
                'max_nodata_fraction': self.dataset.max_nodata_fraction,
            }
        else:
            summary['files'] = len(self.dataset)
        return summary

    def setup(self, stage: str) -> None:
        """Shard the patches over the devices (rasters) or pick the chip sampler.

        Args:
            stage: Only 'fit' is offered (pretraining has no validation data).
        """
        world_size = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        if isinstance(self.dataset, GeoRasterDataset):
            if world_size > 1:
                self.sampler = ValidPatchSampler(
                    self.dataset,
                    size=self.patch_size,
                    length=self.samples_per_epoch,
                    seed=self.seed,
                    rank=rank,
                    world_size=world_size,
                )
        elif world_size > 1:
            self.sampler = DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
            )
        else:
            self.sampler = RandomSampler(
                self.dataset,
                replacement=self.samples_per_epoch > len(self.dataset),
                num_samples=self.samples_per_epoch,
            )

    def state_dict(self) -> dict[str, Any]:
        """Where the raster patch sequence stands, saved by Lightning in every checkpoint.

        Lightning restores a data loader's position only for loaders with a ``state_dict``
        (torchdata's ``StatefulDataLoader``), which torch's ``DataLoader`` lacks; without this a
        run resumed from a checkpoint taken mid-epoch would restart that epoch's patches.

        Returns:
            ``{'epoch': E, 'batches': k}``: ``k`` batches of epoch ``E`` are trained on (an
            epoch that is over counts as the next one, none trained on); empty for chips.
        """
        trainer = self.trainer
        if trainer is None or not isinstance(self.sampler, ValidPatchSampler):
            return {}
        loop = trainer.fit_loop
        epoch = loop.epoch_progress.current.completed
        # Batches fetched and trained on: checkpoints are saved between steps, never inside one.
        batches = loop.epoch_loop.batch_progress.current.ready
        if batches >= trainer.num_training_batches:
            epoch, batches = epoch + 1, 0
        return {'epoch': epoch, 'batches': batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch after its saved batches (see :meth:`state_dict`)."""
        if 'epoch' in state_dict:
            self._resume_at = (int(state_dict['epoch']), int(state_dict['batches']))

    def train_dataloader(self) -> DataLoader[Sample]:
        """Batches of patches; incomplete last batches are dropped (as the official code)."""
        if self._resume_at is not None and isinstance(self.sampler, ValidPatchSampler):
            # Every rank skips its own share of the batches trained on (same count per rank).
            epoch, batches = self._resume_at
            self.sampler.resume(epoch, batches * self.batch_size)
            self._resume_at = None
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """Normalise on the device: ``(x - mean) / std``, nodata pixels set to 0 (the mean).

        Args:
            batch: ``image`` (B, C, H, W) in raw units and any dtype, optionally ``valid``
                (B, H, W); without it, it is rebuilt from the rasters' nodata value.
            dataloader_idx: Index of the data loader.

        Returns:
            The batch with the normalised float32 image and ``valid``, when known.
        """
        batch = restore_on_device(batch, self.sentinel)
        batch['image'] = normalise(batch['image'], self.mean, self.std, batch.get('valid'))
        return batch


def _full_scale(dtype: str) -> float:
    """Raw value of full scale of a raster dtype: its maximum for integers, 1 for floats."""
    kind = np.dtype(dtype)
    return float(np.iinfo(kind).max) if kind.kind in 'iu' else 1.0


def _chip_bands(root: str | os.PathLike[str], count: int, bands: BandSelection | None) -> list[int]:
    """1-based chip bands to use; chips have no band names, so only indices are accepted."""
    if bands is None:
        return list(range(1, count + 1))
    selected = []
    for band in bands:
        if isinstance(band, str) or not 1 <= band <= count:
            raise InputError(
                root, f'band {band!r} is not in the chips (they have bands 1 to {count}, by index)'
            )
        selected.append(band)
    return selected
