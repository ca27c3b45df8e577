"""GeRSP data: raster patches batched with labelled natural images, and bad natural folders."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geocmid.datamodules.gersp import NATURAL_MEAN, NATURAL_STD, GeRSPDataModule
from geocmid.errors import InputError

#: Solid colour of each natural-image class, so that a batch reveals its labels.
COLOURS = {'cat': (200, 30, 60), 'dog': (10, 250, 90), 'owl': (120, 120, 5)}


def write_natural_images(root: Path, colours: dict[str, tuple[int, int, int]] = COLOURS) -> Path:
    """Two solid-colour images per class (PNG and JPEG), of different sizes and aspect ratios."""
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (40, 30), colour).save(root / name / 'a.png')
        Image.new('RGB', (24, 50), colour).save(root / name / 'b.png')
    return root


@pytest.fixture
def rasters(tmp_path: Path, make_geotiff: Callable[..., Path]) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (4, 96, 96), dtype=np.uint8)
    return make_geotiff('rasters/scene.tif', data)


def make_data(rasters: Path, natural: Path | None, **kwargs: object) -> GeRSPDataModule:
    settings: dict[str, object] = {'patch_size': 32, 'batch_size': 2, 'samples_per_epoch': 6}
    return GeRSPDataModule(rasters=rasters, natural_images=natural, **(settings | kwargs))


def test_batches_pair_patches_with_normalised_natural_images(rasters: Path, tmp_path: Path) -> None:
    data = make_data(rasters, write_natural_images(tmp_path / 'natural'))
    assert data.class_names == ['cat', 'dog', 'owl']
    assert data.num_classes == 3
    summary = data.summary()['natural_images']
    assert summary['files'] == 6 and summary['classes'] == ['cat', 'dog', 'owl']

    data.setup('fit')
    loader = data.train_dataloader()
    steps = list(loader)
    assert len(steps) == 3  # 6 patches per epoch in batches of 2 set the epoch
    labels = []
    mean = torch.tensor(NATURAL_MEAN)[:, None, None]
    std = torch.tensor(NATURAL_STD)[:, None, None]
    for combined, _, _ in steps:
        batch = data.on_after_batch_transfer(combined, 0)
        assert batch['image'].shape == (2, 4, 32, 32)
        assert batch['natural_image'].shape == (2, 3, 32, 32)
        for image, label in zip(batch['natural_image'], batch['natural_label'], strict=True):
            colour = torch.tensor(COLOURS[data.class_names[int(label)]], dtype=torch.float32)
            expected = ((colour[:, None, None] - mean) / std).expand(3, 32, 32)
            torch.testing.assert_close(image, expected, atol=1e-4, rtol=0)
            labels.append(int(label))
    # Six draws without replacement over six images: every image exactly once.
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_natural_images_wrap_around_when_the_epoch_is_longer(rasters: Path, tmp_path: Path) -> None:
    data = make_data(rasters, write_natural_images(tmp_path / 'natural'), samples_per_epoch=16)
    data.setup('fit')
    assert len(list(data.train_dataloader())) == 8


def test_method_needs_natural_images(rasters: Path) -> None:
    with pytest.raises(InputError, match='--natural-images: GeRSP needs a folder'):
        make_data(rasters, None)


def test_missing_natural_folder(rasters: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match='folder does not exist'):
        make_data(rasters, tmp_path / 'nowhere')


def test_natural_folder_without_images(rasters: Path, tmp_path: Path) -> None:
    (tmp_path / 'natural' / 'cat').mkdir(parents=True)
    (tmp_path / 'natural' / 'cat' / 'notes.txt').write_text('no image')
    with pytest.raises(InputError, match='no images found'):
        make_data(rasters, tmp_path / 'natural')


def test_natural_folder_with_one_class(rasters: Path, tmp_path: Path) -> None:
    natural = write_natural_images(tmp_path / 'natural', {'cat': COLOURS['cat']})
    with pytest.raises(InputError, match='1 class sub-folder.*at least 2 needed'):
        make_data(rasters, natural)


def test_grayscale_and_cmyk_natural_images_are_read_as_rgb(rasters: Path, tmp_path: Path) -> None:
    # ImageNet mixes a few grayscale and CMYK JPEGs among the RGB ones.
    natural = tmp_path / 'natural'
    (natural / 'a').mkdir(parents=True)
    (natural / 'b').mkdir(parents=True)
    Image.new('L', (32, 32), 100).save(natural / 'a' / 'gray.jpg')
    Image.new('CMYK', (32, 32), (0, 0, 0, 0)).save(natural / 'b' / 'cmyk.jpg')
    data = make_data(rasters, natural)
    assert data.natural.num_bands == 3
    gray, cmyk = data.natural[0]['image'], data.natural[1]['image']
    assert gray.shape == cmyk.shape == (3, 32, 32)
    torch.testing.assert_close(gray, torch.full((3, 32, 32), 100.0), atol=1.0, rtol=0)
    torch.testing.assert_close(cmyk, torch.full((3, 32, 32), 255.0), atol=1.0, rtol=0)


def test_natural_images_from_the_shared_classification_set(
    rasters: Path, tmp_path: Path, shared_data: Path
) -> None:
    # Real JPEGs in ImageFolder layout (RSSCN7 scenes standing in for natural images; the data
    # stay in ../shared and are only read).
    source = shared_data / 'classification-dev' / 'rsscn7'
    if not source.is_dir():
        pytest.skip(f'{source} absent')
    natural = tmp_path / 'natural'
    for folder in sorted(path for path in source.iterdir() if path.is_dir())[:2]:
        target = natural / folder.name
        target.mkdir(parents=True)
        for image in sorted(folder.glob('*.jpg'))[:2]:
            shutil.copy(image, target)
    data = make_data(rasters, natural, samples_per_epoch=4)
    data.setup('fit')
    combined, _, _ = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(combined, 0)
    assert batch['natural_image'].shape == (2, 3, 32, 32)
    assert data.num_classes == 2
