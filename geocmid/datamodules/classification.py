"""Labelled chip folders split into train and test sets, and the data module that feeds them.

Evaluation (k-NN, linear probe) and classification fine-tuning read the same input: one
labelled folder split stratified with a seed (``--images DIR --split 0.8``), or two folders
given as they are (``--train DIR --test DIR``). :func:`labelled_chips` resolves both forms
once, so the two uses cannot disagree about which image is in which set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets.utils import Sample

from geocmid.datamodules.sharding import PerRankAugmentation, sharded_loader
from geocmid.datasets.chips import ChipFolder, chip_statistics, select_bands, stratified_split
from geocmid.errors import InputError
from geocmid.transforms.augment import fine_tuning_augmentations
from geocmid.types import PathLike


@dataclass(frozen=True)
class LabelledChips:
    """A labelled train set and test set of chips with the same classes and bands.

    Attributes:
        train: Training samples: ``{'image': float32 (C, size, size), 'label': int64}``.
        test: Test samples, as ``train``.
        classes: Class names in label order (the sorted class sub-folder names).
        bands: The 1-based bands of the image files that the samples hold, in channel order.
        train_labels: Label of every training sample.
        test_labels: Label of every test sample.
        source: How the sets were formed, for reports: the folders, split fraction and seed.
    """

    train: Dataset[Sample]
    test: Dataset[Sample]
    classes: list[str]
    bands: list[int]
    train_labels: Tensor
    test_labels: Tensor
    source: dict[str, object]

    @property
    def in_channels(self) -> int:
        """Number of channels of the samples."""
        return len(self.bands)


def labelled_chips(
    images: PathLike | None = None,
    *,
    train: PathLike | None = None,
    test: PathLike | None = None,
    split: float = 0.8,
    seed: int = 0,
    size: int,
    bands: Sequence[int] | None = None,
    resize: Literal['crop', 'squash'] = 'crop',
) -> LabelledChips:
    """Read labelled chip folders as a stratified split or as given train and test folders.

    Args:
        images: One labelled folder (one sub-folder per class), split with ``split``/``seed``.
        train: The training folder, instead of ``images`` (needs ``test``).
        test: The test folder; its classes must be the training folder's.
        split: Share of each class that goes to training when ``images`` is split.
        seed: Seed of the split.
        size: Side in pixels that every image is resized to.
        bands: 1-based bands to keep, in channel order; all bands when None.
        resize: ``'crop'`` keeps the aspect ratio (shorter side to ``size``, centre square);
            ``'squash'`` resizes each side to ``size``.

    Returns:
        The two sets and what they hold.

    Raises:
        InputError: Neither or both forms given, a folder with fewer than two classes, images
            of mixed band counts, train and test folders whose classes or band counts differ,
            or a band outside the images' bands.
    """
    if images is not None and (train is not None or test is not None):
        raise InputError('--images', 'give either --images (split) or --train and --test, not both')
    if images is None and (train is None or test is None):
        raise InputError('--images', 'give a labelled folder, or both --train and --test')
    if images is not None:
        folder = ChipFolder(images, size=size, resize=resize, require_classes=2)
        train_index, test_index = stratified_split(folder.targets, split, seed)
        targets = torch.tensor(folder.targets)
        selected = select_bands(folder, bands)
        return LabelledChips(
            train=Subset(folder, train_index),
            test=Subset(folder, test_index),
            classes=list(folder.classes),
            bands=selected,
            train_labels=targets[train_index],
            test_labels=targets[test_index],
            source={'images': os.fspath(images), 'split': split, 'seed': seed},
        )
    assert train is not None and test is not None
    train_folder = ChipFolder(train, size=size, resize=resize, require_classes=2)
    test_folder = ChipFolder(test, size=size, resize=resize, require_classes=1)
    if test_folder.classes != train_folder.classes:
        missing = sorted(set(train_folder.classes) - set(test_folder.classes))
        extra = sorted(set(test_folder.classes) - set(train_folder.classes))
        raise InputError(
            test,
            f'classes differ from the training folder {train} '
            f'(missing: {", ".join(missing) or "none"}; extra: {", ".join(extra) or "none"})',
        )
    if test_folder.num_bands != train_folder.num_bands:
        raise InputError(
            test,
            f'images have {test_folder.num_bands} band(s) but the training images in {train} '
            f'have {train_folder.num_bands}',
        )
    selected = select_bands(train_folder, bands)
    select_bands(test_folder, bands)
    return LabelledChips(
        train=train_folder,
        test=test_folder,
        classes=list(train_folder.classes),
        bands=selected,
        train_labels=torch.tensor(train_folder.targets),
        test_labels=torch.tensor(test_folder.targets),
        source={'train': os.fspath(train), 'test': os.fspath(test)},
    )


def chip_normalisation(
    chips: LabelledChips,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[list[float], list[float], str]:
    """The given normalisation, or the training chips' band statistics when none is given.

    A random encoder's card fixes no normalisation; standardising with statistics of the
    training chips (never the test chips) gives the network the input scale a pretrained
    encoder would see.

    Args:
        chips: The labelled sets.
        mean: Per-channel mean from a model card, or None.
        std: Per-channel standard deviation from a model card, or None.
        seed: Seed choosing the chips the statistics are computed from.

    Returns:
        ``(mean, std, source)`` with source ``'model card'`` or ``'training chips'``.
    """
    if mean is not None and std is not None:
        return list(mean), list(std), 'model card'
    stats = chip_statistics(chips.train, seed=seed)
    return (
        [float(m) for m in stats.mean],
        [float(s) if s > 0 else 1.0 for s in stats.std],  # a constant band stays as is
        'training chips',
    )


class ChipClassificationDataModule(PerRankAugmentation, NonGeoDataModule):
    """Batches of :class:`LabelledChips` for TorchGeo's classification task.

    The sets are already split, so :meth:`setup` hands them over instead of building a
    dataset per split. As in every TorchGeo data module, normalisation (and, for training,
    augmentation) runs on the device after transfer: random flips and 90 degree rotations,
    which leave an overhead scene's class unchanged.
    """

    def __init__(
        self,
        chips: LabelledChips,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        """Feed ``chips`` normalised with ``mean`` and ``std`` (one value per channel).

        Args:
            chips: The train (fitting) and test (validation) sets.
            mean: Per-channel mean in raw pixel units.
            std: Per-channel standard deviation.
            batch_size: Samples per batch.
            num_workers: Data-loading worker processes.
        """
        super().__init__(ChipFolder, batch_size, num_workers)
        self.chips = chips
        self.mean = torch.tensor(list(mean), dtype=torch.float32)
        self.std = torch.tensor(list(std), dtype=torch.float32)
        self.aug, self.train_aug = fine_tuning_augmentations(self.mean, self.std, rotate=True)

    def _dataloader_factory(self, split: str) -> DataLoader[Sample]:
        """This rank's share of ``split``: shuffled by epoch for training, in order otherwise."""
        return sharded_loader(self, split, self._valid_attribute(f'{split}_dataset', 'dataset'))

    def setup(self, stage: str) -> None:
        """Use the given sets: train for fitting, test for validation and testing."""
        self.train_dataset = self.chips.train
        self.val_dataset = self.chips.test
        self.test_dataset = self.chips.test
