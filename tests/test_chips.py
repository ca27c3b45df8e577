"""Tests for geocmid.datasets.chips on tiny generated PNG, JPEG and TIFF folders."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from geocmid.datasets.chips import (
    ChipFolder,
    chip_statistics,
    read_chip,
    resize_chip,
    stratified_split,
)
from geocmid.errors import InputError


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` (H, W) or (H, W, C) with PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def ramp(height: int, width: int, bands: int, start: int = 0) -> np.ndarray:
    """A (H, W, C) uint8 image whose values all differ."""
    values = np.arange(start, start + height * width * bands) % 256
    return values.reshape(height, width, bands).astype(np.uint8)


# --- reading -----------------------------------------------------------------------------


def test_png_rgb_values_exact(tmp_path: Path) -> None:
    array = ramp(5, 7, 3)
    image = read_chip(save_image(tmp_path / 'a.png', array))
    assert image.dtype == torch.float32
    assert image.shape == (3, 5, 7)
    np.testing.assert_array_equal(image.numpy(), array.transpose(2, 0, 1).astype(np.float32))


def test_png_grayscale_and_16_bit(tmp_path: Path) -> None:
    gray = ramp(4, 6, 1)[..., 0]
    assert read_chip(save_image(tmp_path / 'g.png', gray)).shape == (1, 4, 6)
    deep = (np.arange(24, dtype=np.uint16) * 2000).reshape(4, 6)
    image = read_chip(save_image(tmp_path / 'd.png', deep))
    assert image.shape == (1, 4, 6)
    np.testing.assert_array_equal(image[0].numpy(), deep.astype(np.float32))
    assert image.max().item() == 46000


def test_palette_png_is_decoded_to_colours(tmp_path: Path) -> None:
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    paletted = Image.fromarray(indices, mode='P')
    paletted.putpalette([10, 20, 30, 200, 150, 100] + [0] * 762)
    paletted.save(tmp_path / 'p.png')
    image = read_chip(tmp_path / 'p.png')
    assert image.shape == (3, 2, 2)
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert image[:, 0, 1].tolist() == [200, 150, 100]


def test_jpeg_shape_and_values_close(tmp_path: Path) -> None:
    array = np.full((16, 16, 3), (40, 120, 200), dtype=np.uint8)
    image = read_chip(save_image(tmp_path / 'a.JPG', array))
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor([40.0, 120.0, 200.0]), atol=3)


def test_multiband_tiff_without_crs_reads_exactly_and_quietly(
    make_geotiff: Callable[..., Path],
) -> None:
    array = (np.arange(5 * 6 * 7, dtype=np.uint16) * 97).reshape(5, 6, 7)
    path = make_geotiff('chip.tif', array, crs=None)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        image = read_chip(path)
    assert image.shape == (5, 6, 7)
    np.testing.assert_array_equal(image.numpy(), array.astype(np.float32))


# --- the folder ----------------------------------------------------------------------------


def test_unlabelled_folder_is_recursive_and_skips_other_files(tmp_path: Path) -> None:
    save_image(tmp_path / 'b.png', ramp(8, 8, 3))
    save_image(tmp_path / 'deep' / 'er' / 'a.png', ramp(8, 8, 3, start=5))
    save_image(tmp_path / '.ipynb_checkpoints' / 'c.png', ramp(8, 8, 3))
    save_image(tmp_path / 'x' / '.hidden.png', ramp(8, 8, 3))
    (tmp_path / 'notes.txt').write_text('not an image')
    dataset = ChipFolder(tmp_path)
    assert dataset.files == [tmp_path / 'b.png', tmp_path / 'deep' / 'er' / 'a.png']
    assert len(dataset) == 2
    assert dataset.num_bands == 3
    sample = dataset[1]
    assert set(sample) == {'image'}
    np.testing.assert_array_equal(sample['image'][:, 0, 0].numpy(), [5, 6, 7])


def test_labelled_folder_maps_sorted_first_level_folders(tmp_path: Path) -> None:
    save_image(tmp_path / 'water' / 'w1.png', ramp(8, 8, 3))
    save_image(tmp_path / 'forest' / 'f1.png', ramp(8, 8, 3))
    save_image(tmp_path / 'forest' / 'nested' / 'f2.png', ramp(8, 8, 3))
    save_image(tmp_path / 'urban' / 'u1.png', ramp(8, 8, 3))
    (tmp_path / 'empty').mkdir()
    dataset = ChipFolder(tmp_path, require_classes=2)
    assert dataset.classes == ['forest', 'urban', 'water']
    assert dataset.class_to_idx == {'forest': 0, 'urban': 1, 'water': 2}
    by_name = {
        path.name: target for path, target in zip(dataset.files, dataset.targets, strict=True)
    }
    assert by_name == {'f1.png': 0, 'f2.png': 0, 'u1.png': 1, 'w1.png': 2}
    index = dataset.files.index(tmp_path / 'water' / 'w1.png')
    label = dataset[index]['label']
    assert label.dtype == torch.int64
    assert label.shape == ()
    assert label.item() == 2


def test_unlabelled_folder_ignores_class_folders(tmp_path: Path) -> None:
    save_image(tmp_path / 'water' / 'w1.png', ramp(8, 8, 3))
    dataset = ChipFolder(tmp_path)
    assert dataset.classes == []
    assert 'label' not in dataset[0]


def test_resized_samples_batch(tmp_path: Path) -> None:
    save_image(tmp_path / 'a' / '1.png', ramp(12, 20, 3))
    save_image(tmp_path / 'b' / '2.png', ramp(30, 16, 3))
    dataset = ChipFolder(tmp_path, size=8, require_classes=2)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch['image'].shape == (2, 3, 8, 8)
    assert batch['image'].dtype == torch.float32
    assert batch['label'].tolist() == [0, 1]


def test_transforms_are_applied(tmp_path: Path) -> None:
    save_image(tmp_path / 'a.png', ramp(4, 4, 3))

    def halve(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {'image': sample['image'] / 2}

    assert ChipFolder(tmp_path, transforms=halve)[0]['image'][:, 0, 0].tolist() == [0, 0.5, 1]


# --- resizing ------------------------------------------------------------------------------


def test_crop_keeps_the_centre_and_squash_keeps_everything() -> None:
    # 16 x 64 image whose left quarter is bright: a centre crop drops it, squashing keeps it.
    image = torch.zeros(2, 16, 64)
    image[:, :, :16] = 200
    cropped = resize_chip(image, 8, 'crop')
    squashed = resize_chip(image, 8, 'squash')
    assert cropped.shape == squashed.shape == (2, 8, 8)
    assert cropped.max().item() == 0
    assert torch.allclose(squashed[:, :, 0], torch.tensor(200.0))
    assert torch.allclose(squashed[:, :, -1], torch.tensor(0.0))


def test_crop_without_scaling_is_the_exact_centre() -> None:
    image = torch.arange(3 * 8 * 32, dtype=torch.float32).reshape(3, 8, 32)
    torch.testing.assert_close(resize_chip(image, 8, 'crop'), image[:, :, 12:20])


def test_resize_stays_within_the_input_range() -> None:
    image = torch.rand(4, 37, 23, generator=torch.Generator().manual_seed(0)) * 5000
    for mode in ('crop', 'squash'):
        resized = resize_chip(image, 16, mode)  # type: ignore[arg-type]
        assert resized.min() >= image.min() - 1e-3
        assert resized.max() <= image.max() + 1e-3


# --- bad input -----------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match='folder does not exist') as error:
        ChipFolder(tmp_path / 'nope')
    assert str(error.value).startswith(str(tmp_path / 'nope'))


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = save_image(tmp_path / 'a.png', ramp(4, 4, 3))
    with pytest.raises(InputError, match='not a folder'):
        ChipFolder(path)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / 'readme.txt').write_text('hello')
    with pytest.raises(InputError, match='no images found') as error:
        ChipFolder(tmp_path)
    assert error.value.source == str(tmp_path)


@pytest.mark.parametrize('name', ['fake.jpg', 'fake.png', 'fake.tif'])
def test_text_renamed_as_image(tmp_path: Path, name: str) -> None:
    save_image(tmp_path / 'good.png', ramp(4, 4, 3))
    (tmp_path / name).write_text('this is a text file, not an image')
    with pytest.raises(InputError, match='cannot read image') as error:
        ChipFolder(tmp_path)
    assert error.value.source == str(tmp_path / name)
    assert '\n' not in str(error.value)


def test_truncated_image_fails_when_read(tmp_path: Path) -> None:
    good = save_image(tmp_path / 'a.png', ramp(64, 64, 3))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match='cannot read image') as error:
        ChipFolder(tmp_path)[0]
    assert error.value.source == str(good)


def test_mixed_band_counts_name_both_files(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    rgb = save_image(tmp_path / 'a.png', ramp(8, 8, 3))
    multi = make_geotiff('b.tif', np.ones((5, 8, 8), dtype=np.uint16), crs=None)
    with pytest.raises(InputError, match='same number of bands') as error:
        ChipFolder(tmp_path)
    message = str(error.value)
    assert str(rgb) in message
    assert str(multi) in message
    assert '5 band(s)' in message
    assert 'has 3' in message


def test_rgb_mode_converts_grayscale_palette_and_one_band_tiff(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    rgb = ramp(4, 4, 3)
    save_image(tmp_path / 'a_rgb.png', rgb)
    save_image(tmp_path / 'b_gray.png', np.full((4, 4), 77, dtype=np.uint8))
    paletted = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode='P')
    paletted.putpalette([10, 20, 30] + [0] * 765)
    paletted.save(tmp_path / 'c_palette.png')
    make_geotiff('d_gray.tif', np.full((1, 4, 4), 9, dtype=np.uint8), crs=None)
    with pytest.raises(InputError, match='same number of bands'):
        ChipFolder(tmp_path)

    dataset = ChipFolder(tmp_path, mode='rgb')

    assert dataset.num_bands == 3
    images = [dataset[index]['image'] for index in range(len(dataset))]
    assert [tuple(image.shape) for image in images] == [(3, 4, 4)] * 4
    np.testing.assert_array_equal(images[0].numpy(), rgb.transpose(2, 0, 1))
    assert images[1][:, 0, 0].tolist() == [77, 77, 77]
    assert images[2][:, 0, 0].tolist() == [10, 20, 30]
    assert images[3][:, 0, 0].tolist() == [9, 9, 9]


def test_rgb_mode_rejects_tiffs_of_other_band_counts(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    save_image(tmp_path / 'a.png', ramp(4, 4, 3))
    multi = make_geotiff('b.tif', np.ones((4, 4, 4), dtype=np.uint8), crs=None)
    with pytest.raises(InputError, match='has 4 bands; an RGB image needs 1 or 3') as error:
        ChipFolder(tmp_path, mode='rgb')
    assert error.value.source == str(multi)


def test_too_few_classes(tmp_path: Path) -> None:
    save_image(tmp_path / 'only' / 'a.png', ramp(4, 4, 3))
    with pytest.raises(InputError, match=r'1 class sub-folder\(s\) with images \(only\)'):
        ChipFolder(tmp_path, require_classes=2)
    assert ChipFolder(tmp_path, require_classes=1).classes == ['only']


def test_labelled_image_outside_class_folders(tmp_path: Path) -> None:
    save_image(tmp_path / 'a' / '1.png', ramp(4, 4, 3))
    save_image(tmp_path / 'b' / '2.png', ramp(4, 4, 3))
    stray = save_image(tmp_path / 'stray.png', ramp(4, 4, 3))
    with pytest.raises(InputError, match='not in a class sub-folder') as error:
        ChipFolder(tmp_path, require_classes=2)
    assert error.value.source == str(stray)


@pytest.mark.parametrize(
    ('options', 'source'),
    [
        ({'size': 0}, 'size'),
        ({'resize': 'stretch'}, 'resize'),
        ({'require_classes': -1}, 'require_classes'),
        ({'mode': 'cmyk'}, 'mode'),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, object], source: str) -> None:
    save_image(tmp_path / 'a.png', ramp(4, 4, 3))
    with pytest.raises(InputError) as error:
        ChipFolder(tmp_path, **options)  # type: ignore[arg-type]
    assert error.value.source == source


# --- stratified split ----------------------------------------------------------------------


def test_stratified_split_keeps_class_proportions() -> None:
    labels = [0] * 10 + [1] * 20 + [2] * 5
    train, test = stratified_split(labels, 0.6, seed=1)
    assert sorted(train + test) == list(range(35))
    assert not set(train) & set(test)
    assert train == sorted(train)
    counts = {c: sum(labels[i] == c for i in train) for c in (0, 1, 2)}
    assert counts == {0: 6, 1: 12, 2: 3}


def test_stratified_split_is_seeded() -> None:
    labels = np.repeat(np.arange(4), 25)
    assert stratified_split(labels, 0.5, seed=3) == stratified_split(labels, 0.5, seed=3)
    assert stratified_split(labels, 0.5, seed=3) != stratified_split(labels, 0.5, seed=4)


def test_stratified_split_small_classes_reach_both_sides() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    train, test = stratified_split(labels, 0.9, seed=0)
    assert 2 in train  # a single-sample class goes to train
    assert {int(labels[i]) for i in test} == {0, 2}
    assert sum(int(labels[i]) == 0 for i in train) == 1


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.5, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(InputError, match='train_fraction'):
        stratified_split([0, 1], fraction, seed=0)


# --- statistics ----------------------------------------------------------------------------


def reference_statistics(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std per band, from all pixels laid side by side."""
    pixels = np.concatenate([image.reshape(image.shape[0], -1) for image in images], axis=1)
    return pixels.astype(np.float64).mean(axis=1), pixels.astype(np.float64).std(axis=1)


def write_uint16_chips(root: Path, make_geotiff: Callable[..., Path]) -> list[np.ndarray]:
    """Three 2-band uint16 chips of different sizes around reflectance-like values."""
    rng = np.random.default_rng(0)
    images = [
        (10000 + rng.integers(0, 3000, size=(2, h, w))).astype(np.uint16)
        for h, w in ((5, 7), (9, 4), (6, 6))
    ]
    for number, image in enumerate(images):
        make_geotiff(f'{root.name}/{number}.tif', image, crs=None)
    return images


def test_chip_statistics_match_pixels_of_all_chips(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    images = write_uint16_chips(tmp_path / 'chips', make_geotiff)
    stats = chip_statistics(ChipFolder(tmp_path / 'chips'), max_chips=10)
    expected_mean, expected_std = reference_statistics(images)
    np.testing.assert_allclose(stats.mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, expected_std, rtol=1e-9)
    assert stats.count.tolist() == [35 + 36 + 36] * 2
    assert stats.minimum.tolist() == [min(int(image[b].min()) for image in images) for b in (0, 1)]
    assert stats.exact


def test_chip_statistics_sample_is_a_seeded_subset(
    tmp_path: Path, make_geotiff: Callable[..., Path]
) -> None:
    images = write_uint16_chips(tmp_path / 'chips', make_geotiff)
    dataset = ChipFolder(tmp_path / 'chips')
    stats = chip_statistics(dataset, max_chips=2, seed=7)
    assert not stats.exact
    np.testing.assert_array_equal(chip_statistics(dataset, max_chips=2, seed=7).mean, stats.mean)
    matches = [
        pair
        for pair in itertools.combinations(range(3), 2)
        if np.allclose(stats.mean, reference_statistics([images[i] for i in pair])[0])
        and np.allclose(stats.std, reference_statistics([images[i] for i in pair])[1])
    ]
    assert len(matches) == 1


# --- real data -----------------------------------------------------------------------------


def test_real_scene_classification_folder(shared_data: Path) -> None:
    root = shared_data / 'classification-dev' / 'rsscn7'
    dataset = ChipFolder(root, size=64, require_classes=2)
    assert len(dataset) == 210
    assert dataset.num_bands == 3
    assert dataset.classes[0] == 'aGrass'
    assert len(dataset.classes) == 7
    assert np.bincount(dataset.targets).tolist() == [30] * 7
    sample = dataset[45]
    assert sample['image'].shape == (3, 64, 64)
    assert sample['label'].item() == dataset.class_to_idx[dataset.files[45].parent.name]
    assert 0 <= sample['image'].min() and sample['image'].max() <= 255
    train, test = stratified_split(dataset.targets, 0.2, seed=0)
    assert (len(train), len(test)) == (42, 168)
