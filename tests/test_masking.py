"""Tests for geocmid.models.masking: block masks, mask resizing and the mean fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geocmid.errors import InputError
from geocmid.models.masking import block_mask, masked_cell_count, mean_fill, resize_mask


@pytest.mark.parametrize(
    ('size', 'ratio', 'grid', 'count'),
    [
        (224, 0.6, (7, 7), 30),
        (64, 0.6, (2, 2), 3),
        ((64, 160), 0.3, (2, 5), 3),
        (128, 0.5, (4, 4), 8),
    ],
)
def test_block_mask_masks_exact_count(
    size: int | tuple[int, int], ratio: float, grid: tuple[int, int], count: int
) -> None:
    mask = block_mask(16, size, ratio=ratio)
    assert mask.shape == (16, *grid)
    assert mask.dtype == torch.bool
    assert mask.flatten(1).sum(dim=1).tolist() == [count] * 16


def test_masked_cell_count_avoids_float_ceil_trap() -> None:
    # 10 * 0.3 == 3.0000000000000004 in floating point; a bare ceil would give 4.
    assert masked_cell_count(10, 0.3) == 3
    assert masked_cell_count(49, 0.6) == 30


def test_block_mask_is_reproducible_and_independent_per_image() -> None:
    first = block_mask(8, 224, generator=torch.Generator().manual_seed(3))
    second = block_mask(8, 224, generator=torch.Generator().manual_seed(3))
    other = block_mask(8, 224, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert len({tuple(m.flatten().tolist()) for m in first}) == 8


def test_block_mask_is_uniform_over_cells() -> None:
    mask = block_mask(4000, 224, generator=torch.Generator().manual_seed(0))
    frequency = mask.float().mean(dim=0)
    assert torch.allclose(frequency, torch.full((7, 7), 30 / 49), atol=0.03)


@pytest.mark.parametrize('ratio', [0.0, 1.0, -0.1, 1.5])
def test_block_mask_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(InputError, match='task.mask_ratio'):
        block_mask(2, 64, ratio=ratio)


def test_block_mask_rejects_size_not_tiling_cells() -> None:
    with pytest.raises(InputError, match='--patch-size: 72 x 72 px'):
        block_mask(2, 72)


def test_resize_mask_up_repeats_cells_and_down_inverts() -> None:
    cells = block_mask(3, 96, generator=torch.Generator().manual_seed(1))
    pixels = resize_mask(cells, 96)
    expected = np.stack([np.kron(c.numpy(), np.ones((32, 32), dtype=bool)) for c in cells])
    assert pixels.dtype == torch.bool
    np.testing.assert_array_equal(pixels.numpy(), expected)
    # Down to the stem grid (stride 4) and back to cells: block masks survive exactly.
    stem = resize_mask(pixels[:, None], 24)
    assert stem.shape == (3, 24, 24)
    np.testing.assert_array_equal(stem.numpy(), expected[:, ::4, ::4])
    assert torch.equal(resize_mask(stem, 3), cells)


def _numpy_mean_fill(x: np.ndarray, mask: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    out = x.copy()
    batch, channels = x.shape[:2]
    for b in range(batch):
        for c in range(channels):
            pixels = x[b, c] if valid is None else x[b, c][valid[b]]
            mean = sum(pixels.ravel().tolist()) / max(pixels.size, 1)
            out[b, c][mask[b]] = mean
    return out


def test_mean_fill_matches_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    cells = block_mask(2, 64, generator=torch.Generator().manual_seed(2))
    filled = mean_fill(torch.from_numpy(x), cells)
    pixel_mask = resize_mask(cells, 64).numpy()
    np.testing.assert_allclose(filled.numpy(), _numpy_mean_fill(x, pixel_mask, None), atol=1e-5)
    visible = np.broadcast_to(~pixel_mask[:, None], x.shape)
    np.testing.assert_array_equal(filled.numpy()[visible], x[visible])


def test_mean_fill_excludes_nodata_from_mean() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 2, 32, 32)).astype(np.float32)
    valid = np.ones((2, 32, 32), dtype=bool)
    valid[0, :, :16] = False
    x[0, :, :, :16] = np.nan  # nodata pixels must not poison the mean
    valid[1] = False  # no valid pixel: the fill value is 0
    mask = torch.ones(2, 1, 1, dtype=torch.bool)
    filled = mean_fill(torch.from_numpy(x), mask, valid=torch.from_numpy(valid)).numpy()
    np.testing.assert_allclose(filled[0, :, 0, 0], x[0, :, :, 16:].mean(axis=(1, 2)), atol=1e-5)
    assert not np.isnan(filled).any()
    np.testing.assert_array_equal(filled[1], 0)
