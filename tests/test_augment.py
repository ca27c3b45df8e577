"""Tests for geocmid.transforms.augment: CMID's two views and the geometry they report."""

from __future__ import annotations

import pytest
import torch

from geocmid.errors import InputError
from geocmid.transforms.augment import (
    CropGeometry,
    RandomGaussNoise,
    TwoViewAugmentation,
    crop_to_geometry,
)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def coordinate_image(batch: int, size: int) -> torch.Tensor:
    """A (batch, 2, size, size) image whose bands are the x and y of each pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
    return torch.stack([xs, ys])[None].repeat(batch, 1, 1, 1)


def expected_coordinates(
    geometry: CropGeometry, out: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source x (B, out) per output column and y (B, out) per output row, from box and flip."""
    x0, y0, x1, y1 = (v[:, None].double() for v in geometry.boxes.cpu().unbind(-1))
    steps = torch.arange(out, dtype=torch.float64) + 0.5
    xs = x0 + steps * (x1 - x0) / out
    xs_flipped = x1 - steps * (x1 - x0) / out
    xs = torch.where(geometry.flipped.cpu()[:, None], xs_flipped, xs)
    ys = y0 + steps * (y1 - y0) / out
    # Sampling clamps at the patch edge, where a linear ramp holds its edge pixel's value.
    return xs.clamp(0.5, size - 0.5), ys.clamp(0.5, size - 0.5)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('size', [48, 128])
def test_crop_a_shows_the_pixels_its_box_and_flip_describe(device: str, size: int) -> None:
    torch.manual_seed(0)
    batch, out = 16, 64
    image = coordinate_image(batch, size).to(device)
    view_a, _ = TwoViewAugmentation(out, [0.0, 0.0], [1.0, 1.0])(image)
    geometry = view_a.geometry
    assert geometry.boxes.shape == (batch, 4) and geometry.flipped.shape == (batch,)
    assert geometry.flipped.dtype == torch.bool
    # Both flip states occur, so the flipped branch is exercised (p 0.5, 16 draws).
    assert geometry.flipped.any() and not geometry.flipped.all()
    xs, ys = expected_coordinates(geometry, out, size)
    got = view_a.image.cpu().double()
    torch.testing.assert_close(got[:, 0], xs[:, None, :].expand(-1, out, -1), atol=1e-3, rtol=0)
    torch.testing.assert_close(got[:, 1], ys[:, :, None].expand(-1, -1, out), atol=1e-3, rtol=0)


def test_crop_boxes_follow_the_random_resized_crop_ranges() -> None:
    torch.manual_seed(1)
    size = 128
    geometry = TwoViewAugmentation(64, [0.0], [1.0]).sample_geometry(256, size, size)
    x0, y0, x1, y1 = geometry.boxes.unbind(-1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all())
    assert bool((x1 <= size).all() and (y1 <= size).all())
    width, height = x1 - x0, y1 - y0
    area = width * height / size**2
    # Rounding the sides to whole pixels moves the area and ratio slightly past the draw's bounds.
    assert bool((area > 0.28).all() and (area <= 1.0).all())
    ratio = width / height
    assert bool((ratio > 0.73).all() and (ratio < 1.37).all())
    assert 0.3 < geometry.flipped.float().mean() < 0.7


def test_a_full_size_crop_has_the_patch_as_its_box() -> None:
    # scale and ratio pinned to 1: the box must be the whole patch, edges included.
    augmentation = TwoViewAugmentation(64, [0.0], [1.0], scale=(1.0, 1.0), ratio=(1.0, 1.0))
    geometry = augmentation.sample_geometry(3, 80, 80)
    torch.testing.assert_close(geometry.boxes, torch.tensor([[0.0, 0.0, 80.0, 80.0]] * 3))


def test_explicit_geometry_crops_and_flips_exactly() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    geometry = CropGeometry(
        boxes=torch.tensor([[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 3.0, 3.0]]),
        flipped=torch.tensor([False, True]),
    )
    crops = crop_to_geometry(image, geometry, 2)
    torch.testing.assert_close(crops[0, 0], torch.tensor([[5.0, 6.0], [9.0, 10.0]]))
    torch.testing.assert_close(crops[1, 0], torch.tensor([[6.0, 5.0], [10.0, 9.0]]))


def test_valid_mask_is_cut_like_the_image() -> None:
    torch.manual_seed(2)
    batch, size, out = 8, 128, 64
    image = coordinate_image(batch, size)
    valid = (image[:, 0] < size / 2) & (image[:, 1] > 40)
    view_a, view_b = TwoViewAugmentation(out, [0.0, 0.0], [1.0, 1.0])(image, valid)
    for view in (view_a, view_b):
        assert view.valid is not None
        assert view.valid.shape == (batch, out, out) and view.valid.dtype == torch.bool
        xs, ys = expected_coordinates(view.geometry, out, size)
        expected = (xs[:, None, :] < size / 2) & (ys[:, :, None] > 40)
        # A sample that falls exactly on a pixel edge may round either way.
        on_edge = ((xs[:, None, :] - size / 2).abs() < 1e-3) | ((ys[:, :, None] - 40).abs() < 1e-3)
        assert bool(((view.valid == expected) | on_edge).all())
        assert view.valid.any() and not view.valid.all()


def test_non_rgb_views_have_the_right_shapes() -> None:
    torch.manual_seed(3)
    augmentation = TwoViewAugmentation(64, [100.0] * 4, [20.0] * 4, max_value=10000.0)
    view_a, view_b = augmentation(torch.randn(3, 4, 80, 80))
    for view in (view_a, view_b):
        assert view.image.shape == (3, 4, 64, 64)
        assert view.geometry.boxes.shape == (3, 4)
        assert view.geometry.flipped.shape == (3,)
        assert view.valid is None
        assert torch.isfinite(view.image).all()


def rerun_with_band_zero_changed(augmentation: TwoViewAugmentation, bands: int) -> torch.Tensor:
    """Crop B twice with the same seed, on inputs that differ only in band 0; other bands' diff."""
    image = torch.randn(8, bands, 64, 64)
    changed = image.clone()
    changed[:, 0] = torch.randn(8, 64, 64) * 3
    torch.manual_seed(4)
    _, view_b = augmentation(image)
    torch.manual_seed(4)
    _, changed_b = augmentation(changed)
    return (view_b.image[:, 1:] - changed_b.image[:, 1:]).abs().amax()


def test_non_rgb_bands_stay_independent() -> None:
    # No hue, saturation or grayscale for non-RGB: band 0 cannot leak into the other bands.
    augmentation = TwoViewAugmentation(64, [0.3] * 4, [0.1] * 4, max_value=1.0)
    assert rerun_with_band_zero_changed(augmentation, 4) == 0


def test_rgb_colour_operations_mix_bands() -> None:
    # The control for the test above: saturation, hue and grayscale do mix RGB bands.
    augmentation = TwoViewAugmentation(64, [0.3] * 3, [0.1] * 3, max_value=1.0, rgb=True)
    assert rerun_with_band_zero_changed(augmentation, 3) > 0.1


def test_rgb_crop_b_stays_within_the_unit_range() -> None:
    # Photometric ops run on [0, 1] and clip like uint8, whatever the normalisation.
    torch.manual_seed(5)
    mean, std = torch.tensor([86.0, 92.0, 85.0]), torch.tensor([35.0, 34.0, 36.0])
    raw = torch.rand(16, 3, 64, 64) * 255
    image = (raw - mean[:, None, None]) / std[:, None, None]
    view_a, view_b = TwoViewAugmentation(64, mean, std, rgb=True)(image)
    unit_b = (view_b.image * std[:, None, None] + mean[:, None, None]) / 255
    assert unit_b.min() >= -1e-4 and unit_b.max() <= 1 + 1e-4
    # Crop A carries no photometric change: it stays within the input's range.
    assert view_a.image.min() >= image.min() - 1e-4 and view_a.image.max() <= image.max() + 1e-4
    assert not torch.allclose(view_b.image.mean(dim=(1, 2, 3)), view_a.image.mean(dim=(1, 2, 3)))


def test_noise_has_the_official_variance_in_normalised_units() -> None:
    torch.manual_seed(6)
    std = torch.tensor([20.0, 40.0])
    # Variance fixed at 25 on the 0-255 scale, i.e. sigma 5 / 255 of full scale (1000 here).
    noise = RandomGaussNoise(variance=(25.0, 25.0), scale=1000.0 / (255.0 * std), p=1.0)
    out = noise(torch.zeros(4, 2, 64, 64))
    expected_sigma = 5.0 * 1000.0 / (255.0 * std)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), expected_sigma, rtol=0.03, atol=0)


def test_non_rgb_noise_is_converted_to_each_bands_normalised_units() -> None:
    # On a constant patch only the noise varies within a crop (brightness and contrast are uniform,
    # blur keeps a constant), so each crop's spatial std is the noise sigma in normalised units:
    # sqrt(10..50) on the 0-255 scale, times max_value / (255 * std) for the band.
    torch.manual_seed(8)
    std, max_value = torch.tensor([50.0, 400.0, 1000.0]), 10000.0
    augmentation = TwoViewAugmentation(64, [0.0] * 3, std, max_value=max_value)
    _, view_b = augmentation(torch.zeros(32, 3, 64, 64))
    sigma_255 = view_b.image.std(dim=(2, 3)) * 255.0 * std / max_value
    noisy = sigma_255 > 1.0
    assert 0.4 < noisy.float().mean() < 0.8  # p 0.6
    assert sigma_255[noisy].min() > 10**0.5 * 0.97
    assert sigma_255[noisy].max() < 50**0.5 * 1.03
    assert bool((sigma_255[~noisy] < 1e-3).all())


def test_noise_clips_to_the_unit_range_when_asked() -> None:
    torch.manual_seed(6)
    noise = RandomGaussNoise(variance=(50.0, 50.0), scale=1 / 255, clip_output=True, p=1.0)
    out = noise(torch.ones(2, 3, 16, 16))
    assert out.max() <= 1.0 and out.min() < 1.0


@pytest.mark.parametrize('rgb', [False, True])
def test_views_are_deterministic_under_a_seed(rgb: bool) -> None:
    augmentation = TwoViewAugmentation(64, [0.3] * 3, [0.1] * 3, max_value=1.0, rgb=rgb)
    image = torch.randn(4, 3, 96, 96)
    valid = torch.rand(4, 96, 96) > 0.2
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(augmentation(image, valid))
    for first, second in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(first.image, second.image, rtol=0, atol=0)
        torch.testing.assert_close(first.geometry.boxes, second.geometry.boxes)
        assert torch.equal(first.geometry.flipped, second.geometry.flipped)
        assert torch.equal(first.valid, second.valid)
    assert not torch.equal(runs[0][1].image, runs[2][1].image)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'mean': [0.0] * 4, 'std': [1.0] * 4, 'rgb': True}, 'rgb: needs exactly 3 bands, got 4'),
        ({'mean': [0.0] * 3, 'std': [1.0] * 2}, '3 means but 2 stds'),
        ({'mean': [0.0] * 2, 'std': [1.0, 0.0]}, 'every std must be positive'),
        ({'mean': [0.0], 'std': [1.0], 'max_value': 0.0}, 'max_value: must be positive'),
    ],
)
def test_bad_statistics_raise_input_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        TwoViewAugmentation(64, **kwargs)  # type: ignore[arg-type]


def test_batch_with_the_wrong_band_count_is_rejected() -> None:
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        TwoViewAugmentation(64, [0.0] * 3, [1.0] * 3)(torch.zeros(2, 4, 64, 64))
