"""Folders of non-georeferenced image chips: JPEG, PNG or TIFF with any number of bands.

One reader serves three uses: pretraining on ``--images DIR`` (every image under the folder,
labels ignored), and labelled folders in ImageFolder layout (one first-level sub-folder per
class) for evaluation, classification fine-tuning and GeRSP's natural-image branch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import rasterio
import torch
from PIL import Image, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from torch import Tensor
from torch.utils.data import Dataset
from torchgeo.datasets import NonGeoDataset
from torchgeo.datasets.utils import Sample
from torchvision.transforms.v2 import functional as F

from geocmid.errors import InputError
from geocmid.raster.stats import BandStats

#: Image file suffixes that are read (compared case-insensitively).
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png', '.tif', '.tiff')

#: Chip side in pixels when no model card fixes a patch size (random encoders, new runs).
DEFAULT_SIZE = 224

#: Suffixes read through rasterio, so TIFFs with any band count and dtype keep all bands.
TIFF_SUFFIXES = ('.tif', '.tiff')

#: PIL modes whose values are not band intensities (palette indices, bilevel, other colour
#: spaces), and the mode they are decoded to. Every other mode is read as stored.
PIL_CONVERSIONS = {
    '1': 'L',
    'P': 'RGB',
    'PA': 'RGBA',
    'CMYK': 'RGB',
    'YCbCr': 'RGB',
    'LAB': 'RGB',
    'HSV': 'RGB',
}

#: How chips are decoded: None keeps the bands as stored; ``'rgb'`` gives every chip three
#: bands (see :func:`read_chip`), for natural-image folders that mix RGB, grayscale and CMYK.
type ChipMode = Literal['rgb'] | None


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a failure to decode ``path`` into an InputError naming it.

    Chips carry no georeference by design, so rasterio's warning about it is silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', NotGeoreferencedWarning)
            yield
    except (UnidentifiedImageError, RasterioIOError) as error:
        # Their messages repeat the path; the chained error keeps the details.
        raise InputError(path, 'cannot read image: unknown format or corrupt file') from error
    except OSError as error:  # e.g. PIL's "image file is truncated"
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(path, f'cannot read image: {message}') from error


def _check_rgb_tiff(path: Path, count: int) -> None:
    """Fail unless a TIFF of ``count`` bands can be read as RGB (gray is repeated)."""
    if count not in (1, 3):
        raise InputError(path, f'has {count} bands; an RGB image needs 1 or 3')


def _band_count(path: Path, mode: ChipMode = None) -> int:
    """Number of bands ``read_chip`` returns for ``path``, read from the header only.

    Raises:
        InputError: if the file is not a readable image, or (``mode='rgb'``) a TIFF with
            neither 1 nor 3 bands.
    """
    with _reading(path):
        if path.suffix.lower() in TIFF_SUFFIXES:
            with rasterio.open(path) as src:
                count = int(src.count)
            if mode == 'rgb':
                _check_rgb_tiff(path, count)
                return 3
            return count
        with Image.open(path) as image:
            decoded = 'RGB' if mode == 'rgb' else PIL_CONVERSIONS.get(image.mode, image.mode)
            return Image.getmodebands(decoded)


def read_chip(path: str | os.PathLike[str], mode: ChipMode = None) -> Tensor:
    """Read one image as float32 (C, H, W) with its raw pixel values (not normalised).

    TIFFs are read with rasterio (any band count and dtype). JPEG and PNG are read with PIL;
    palette and other non-intensity modes are decoded to RGB(A) first.

    Args:
        path: the image file.
        mode: None reads the bands as stored; ``'rgb'`` converts JPEG and PNG to RGB with PIL
            (grayscale, palette, CMYK; alpha is dropped) and repeats a 1-band TIFF three times.

    Returns:
        the image, float32 (C, H, W).

    Raises:
        InputError: if the file cannot be read as an image, or (``mode='rgb'``) is a TIFF with
            neither 1 nor 3 bands.
    """
    path = Path(path)
    array: npt.NDArray[np.generic]
    with _reading(path):
        if path.suffix.lower() in TIFF_SUFFIXES:
            with rasterio.open(path) as src:
                array = src.read()
            if mode == 'rgb':
                _check_rgb_tiff(path, len(array))
                array = array.repeat(3 // len(array), axis=0)
        else:
            with Image.open(path) as image:
                target = 'RGB' if mode == 'rgb' else PIL_CONVERSIONS.get(image.mode)
                array = np.asarray(image.convert(target) if target else image)
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.astype(np.float32))


def resize_chip(image: Tensor, size: int, resize: Literal['crop', 'squash'] = 'crop') -> Tensor:
    """Resize a (C, H, W) image to ``size`` x ``size``, bilinear with antialiasing.

    Args:
        image: the image.
        size: side of the result in pixels.
        resize: ``'crop'`` scales the shorter side to ``size`` and keeps the centre square;
            ``'squash'`` scales each side to ``size``.

    Returns:
        the resized image, same dtype.
    """
    if resize == 'squash':
        return F.resize(image, [size, size], antialias=True)
    image = F.resize(image, [size], antialias=True)
    return F.center_crop(image, [size, size])


def _is_visible(path: Path, root: Path) -> bool:
    """Whether no part of ``path`` below ``root`` is hidden (``.git``, ``.ipynb_checkpoints``)."""
    return not any(part.startswith('.') for part in path.relative_to(root).parts)


class ChipFolder(NonGeoDataset):
    """Every image in a folder and its sub-folders, optionally labelled by class sub-folder.

    Unlabelled (``require_classes=0``), every image at any depth is a sample. Labelled
    (``require_classes >= 1``), the folder follows the ImageFolder layout: the class of an
    image is the name of the first-level sub-folder holding it (at any depth below), and class
    indices follow the sorted class names. Sub-folders holding no image are not classes.

    All images must have the same number of bands, unless ``mode='rgb'`` converts each to RGB;
    this and readability are checked from the file headers when the dataset is built, so a bad
    file is named before training starts.
    TorchGeo's ``NonGeoClassificationDataset`` is not used because it requires class
    sub-folders and decodes every image through PIL, which drops multi-band TIFFs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        size: int | None = None,
        resize: Literal['crop', 'squash'] = 'crop',
        require_classes: int = 0,
        mode: ChipMode = None,
        transforms: Callable[[Sample], Sample] | None = None,
    ) -> None:
        """Index the images under ``root`` and check them.

        Args:
            root: folder of images (JPEG, PNG, TIFF), searched recursively; hidden files and
                folders are skipped.
            size: side in pixels of the square images returned, or None to return each image
                at its native size (for pretraining, whose augmentation cuts crops itself;
                batching then needs equal sizes or a cropping ``transforms``).
            resize: how an image reaches ``size``: ``'crop'`` resizes the shorter side to
                ``size`` (bilinear, antialiased) and keeps the centre square, preserving the
                aspect ratio; ``'squash'`` resizes both sides to ``size``, keeping all content.
            require_classes: 0 for unlabelled samples; otherwise samples carry a ``label`` and
                at least this many class sub-folders must hold images.
            mode: None keeps each image's bands as stored (all must have as many); ``'rgb'``
                converts every image to 3 bands (see :func:`read_chip`), as natural-image
                collections such as ImageNet mix RGB, grayscale and CMYK JPEGs.
            transforms: a function applied to each sample dict.

        Raises:
            InputError: if ``root`` is missing or holds no image, an image cannot be read,
                band counts differ, an image lies outside any class sub-folder (labelled),
                there are fewer than ``require_classes`` classes, or an option is invalid.
        """
        if size is not None and size < 1:
            raise InputError('size', f'must be a positive number of pixels, got {size}')
        if resize not in ('crop', 'squash'):
            raise InputError('resize', f"must be 'crop' or 'squash', got {resize!r}")
        if require_classes < 0:
            raise InputError('require_classes', f'must be 0 or more, got {require_classes}')
        if mode not in (None, 'rgb'):
            raise InputError('mode', f"must be None or 'rgb', got {mode!r}")
        self.root = Path(root)
        self.size = size
        self.resize = resize
        self.mode = mode
        self.transforms = transforms
        self.labelled = require_classes > 0

        if not self.root.exists():
            raise InputError(self.root, 'folder does not exist')
        if not self.root.is_dir():
            raise InputError(self.root, 'not a folder')
        self.files: list[Path] = sorted(
            path
            for path in self.root.rglob('*')
            if path.suffix.lower() in IMAGE_SUFFIXES
            and _is_visible(path, self.root)
            and path.is_file()
        )
        if not self.files:
            suffixes = ', '.join(IMAGE_SUFFIXES)
            raise InputError(self.root, f'no images found ({suffixes}) in it or its sub-folders')
        self.num_bands = self._check_band_counts()

        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}
        self.targets: list[int] = []
        if self.labelled:
            self._index_classes(require_classes)

    def _check_band_counts(self) -> int:
        """The band count shared by all images.

        Raises:
            InputError: naming two files whose band counts differ.
        """
        first = self.files[0]
        expected = _band_count(first, self.mode)
        for path in self.files[1:]:
            count = _band_count(path, self.mode)
            if count != expected:
                raise InputError(
                    path,
                    f'has {count} band(s) but {first} has {expected}; '
                    'all images must have the same number of bands',
                )
        return expected

    def _index_classes(self, require_classes: int) -> None:
        """Assign each image the class of its first-level sub-folder."""
        folders = []
        for path in self.files:
            parts = path.relative_to(self.root).parts
            if len(parts) == 1:
                raise InputError(
                    path, 'image is not in a class sub-folder (one sub-folder per class)'
                )
            folders.append(parts[0])
        self.classes = sorted(set(folders))
        if len(self.classes) < require_classes:
            found = ', '.join(self.classes)
            raise InputError(
                self.root,
                f'{len(self.classes)} class sub-folder(s) with images ({found}); '
                f'at least {require_classes} needed',
            )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.targets = [self.class_to_idx[folder] for folder in folders]

    def __len__(self) -> int:
        """Number of images."""
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        """Read one image, resized if ``size`` was given.

        Args:
            index: index of the image.

        Returns:
            ``{'image': float32 (C, H, W)}``, plus ``'label'`` (int64 scalar) when labelled.
        """
        image = read_chip(self.files[index], self.mode)
        if self.size is not None:
            image = resize_chip(image, self.size, self.resize)
        sample = {'image': image}
        if self.labelled:
            sample['label'] = torch.tensor(self.targets[index], dtype=torch.long)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def stratified_split(
    labels: Sequence[int] | Tensor | npt.NDArray[np.integer],
    train_fraction: float,
    seed: int,
) -> tuple[list[int], list[int]]:
    """Split sample indices into train and test sets with the same class proportions.

    Each class is shuffled with ``seed`` and its first ``round(n * train_fraction)`` samples
    go to train, clipped so a class of two or more samples has at least one on each side (a
    single-sample class goes to train). Written by hand because scikit-learn is not a
    dependency.

    Args:
        labels: class index of every sample.
        train_fraction: share of each class to put in train, strictly between 0 and 1.
        seed: seed of the shuffle; the same seed gives the same split.

    Returns:
        sorted train indices and sorted test indices.

    Raises:
        InputError: if ``train_fraction`` is not strictly between 0 and 1.
    """
    if not 0 < train_fraction < 1:
        raise InputError('train_fraction', f'must be between 0 and 1, got {train_fraction}')
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(len(members) * train_fraction)
        n_train = max(1, min(n_train, len(members) - 1)) if len(members) > 1 else 1
        train.extend(members[:n_train].tolist())
        test.extend(members[n_train:].tolist())
    return sorted(train), sorted(test)


def chip_statistics(dataset: Dataset[Sample], max_chips: int = 256, seed: int = 0) -> BandStats:
    """Per-band statistics over a random sample of a dataset's images.

    Every pixel of each chosen image counts once; chips are merged with the exact parallel
    update of :class:`~geocmid.raster.stats.BandStats`, the same statistics rasters get.

    Args:
        dataset: a dataset whose samples hold ``'image'`` (C, H, W).
        max_chips: at most this many images are read, chosen without replacement.
        seed: seed of the choice.

    Returns:
        the statistics (``mean``, ``std``, ``minimum``, ``maximum`` per band); ``exact`` is
        True when every image was read.
    """
    count = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
    if count == 0 or max_chips < 1:
        raise ValueError(f'nothing to sample: {count} images, max_chips={max_chips}')
    chosen = np.random.default_rng(seed).permutation(count)[:max_chips]
    images = (dataset[index]['image'].numpy() for index in sorted(chosen.tolist()))
    chips = (BandStats.from_pixels(image, np.ones(image.shape[1:], bool)) for image in images)
    stats = functools.reduce(BandStats.merge, chips)
    return dataclasses.replace(stats, exact=len(chosen) == count)


class SelectBands:
    """Sample transform keeping the given 1-based bands of ``sample['image']``, in that order.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, bands: Sequence[int]) -> None:
        """Keep ``bands`` (1-based band indices)."""
        self.indices = torch.tensor([band - 1 for band in bands])

    def __call__(self, sample: Sample) -> Sample:
        """Return ``sample`` with only the selected bands in its image."""
        return {**sample, 'image': sample['image'][self.indices]}


def select_bands(folder: ChipFolder, bands: Sequence[int] | None) -> list[int]:
    """Check ``bands`` against the folder's images and make the folder return only those.

    Args:
        folder: The chips.
        bands: 1-based bands to keep, in channel order; None keeps all.

    Returns:
        The bands kept.

    Raises:
        InputError: An empty selection or a band the images lack.
    """
    if bands is None:
        return list(range(1, folder.num_bands + 1))
    if not bands:
        raise InputError('--bands', 'empty band selection')
    bad = [band for band in bands if not 1 <= band <= folder.num_bands]
    if bad:
        raise InputError(
            folder.root,
            f'band(s) {", ".join(map(str, bad))} requested but the images have '
            f'{folder.num_bands} band(s), numbered from 1',
        )
    folder.transforms = SelectBands(bands)
    return list(bands)
