"""GeRSP's data: the pretraining patches plus a labelled folder of natural images.

Every step pairs a batch of patches (:class:`~geocmid.datamodules.pretrain.PretrainDataModule`) with
an equally large batch of natural images from a folder in ImageFolder layout, one sub-folder per
class (``docs/gersp.md#data``). The patches define the epoch, so the epoch-based schedule means the
same with or without natural images (the official epoch was one pass over ImageNet,
``docs/gersp.md#deviations``). Natural images are drawn in a fresh random order every epoch, a
different one on each device, wrapping around when the folder has fewer images than an epoch needs.

Natural images are read as 8-bit RGB (JPEG, PNG or TIFF; grayscale, palette and CMYK images, a
few of which ImageNet holds, are converted), resized to the patch size (shorter side, then the
centre square) and normalised on the device with ImageNet statistics, as the official code did
(``docs/gersp.md#data``); the task maps them onto the rasters' bands.
"""

from __future__ import annotations

import os
from typing import Any

import timm.data
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, RandomSampler
from torchgeo.datasets.utils import Sample

from geocmid.datamodules.pretrain import PretrainDataModule
from geocmid.datasets.chips import ChipFolder
from geocmid.errors import InputError

__all__ = ('NATURAL_MEAN', 'NATURAL_STD', 'GeRSPDataModule')

#: ImageNet mean and standard deviation of natural RGB images, in 8-bit units.
NATURAL_MEAN = tuple(255 * value for value in timm.data.IMAGENET_DEFAULT_MEAN)
NATURAL_STD = tuple(255 * value for value in timm.data.IMAGENET_DEFAULT_STD)


class GeRSPDataModule(PretrainDataModule):
    """Pretraining patches and labelled natural images, batched together (see module docstring).

    Batches reach the task as one dict: the patch keys (``image``, optionally ``valid``), plus
    ``natural_image`` (B, 3, S, S) normalised and ``natural_label`` (B,) class indices.

    Attributes:
        natural: The natural-image folder.
        class_names: Class of each classifier output, in order (sorted sub-folder names).
        natural_mean: Per-channel mean of the natural images' normalisation, 8-bit units.
        natural_std: Per-channel standard deviation of that normalisation, 8-bit units.
    """

    def __init__(
        self, *, natural_images: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> None:
        """Open and check the patches and the natural images.

        Args:
            natural_images: Folder with one sub-folder of images per class (at least two).
            **kwargs: Passed to :class:`~geocmid.datamodules.pretrain.PretrainDataModule`.

        Raises:
            InputError: If ``natural_images`` is missing, is not a folder, holds no images, has
                fewer than two classes or a TIFF with neither 1 nor 3 bands; or for bad patch
                data.
        """
        if natural_images is None:
            raise InputError(
                '--natural-images',
                'GeRSP needs a folder of natural images, one sub-folder per class',
            )
        super().__init__(**kwargs)
        # ImageNet holds some grayscale and CMYK JPEGs among the RGB ones: all are read as RGB.
        self.natural = ChipFolder(
            natural_images, size=self.patch_size, require_classes=2, mode='rgb'
        )
        self.class_names = list(self.natural.classes)
        self.natural_mean = torch.tensor(NATURAL_MEAN)
        self.natural_std = torch.tensor(NATURAL_STD)
        self.natural_sampler: RandomSampler | None = None

    @property
    def num_classes(self) -> int:
        """Number of natural-image classes."""
        return len(self.class_names)

    def setup(self, stage: str) -> None:
        """Shard the patches, then draw as many natural images per device as patches.

        Args:
            stage: Only 'fit' is offered (pretraining has no validation data).
        """
        super().setup(stage)
        rank = self.trainer.global_rank if self.trainer else 0
        self.natural_sampler = RandomSampler(
            self.natural,
            # Sampler declares no __len__; every sampler the parent's setup() picks is sized.
            num_samples=len(self.sampler),  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(self.seed + rank),
        )

    # Lightning takes any loader here; the parent's is a plain DataLoader, this one zips two.
    def train_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        """Patch batches and natural-image batches of the same size, step by step."""
        natural = DataLoader(
            self.natural,
            batch_size=self.batch_size,
            sampler=self.natural_sampler,
            num_workers=self.num_workers,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        loaders = {'patches': super().train_dataloader(), 'natural': natural}
        return CombinedLoader(loaders, mode='min_size')

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> Sample:
        """Normalise both sources on the device and merge them into one batch dict.

        Args:
            batch: Two samples: ``patches`` (see the parent class) and ``natural`` (``image`` in
                8-bit units, ``label``).
            dataloader_idx: Index of the data loader.

        Returns:
            The normalised patch batch with ``natural_image`` and ``natural_label`` added.
        """
        merged = super().on_after_batch_transfer(batch['patches'], dataloader_idx)
        natural = batch['natural']['image']
        mean = self.natural_mean.to(natural)[None, :, None, None]
        std = self.natural_std.to(natural)[None, :, None, None]
        merged['natural_image'] = (natural - mean) / std
        merged['natural_label'] = batch['natural']['label']
        return merged

    def summary(self) -> dict[str, Any]:
        """What the model card records about the training data, natural images included."""
        return super().summary() | {
            'natural_images': {
                'path': os.fspath(self.natural.root),
                'files': len(self.natural),
                'classes': self.class_names,
            }
        }
