"""Window grids and blend weights."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geocmid.errors import InputError
from geocmid.inference.tiling import (
    BLENDS,
    Strip,
    TileGrid,
    axis_weights,
    default_overlap,
    window_starts,
)


def coverage(grid: TileGrid, blend: str) -> np.ndarray:
    """Total blend weight per pixel, accumulated with explicit loops over the windows."""
    total = np.zeros((grid.height, grid.width))
    for i, j, window in grid.windows():
        weights = grid.weights(i, j, blend)  # type: ignore[arg-type]
        for r in range(weights.shape[0]):
            for c in range(weights.shape[1]):
                total[window.row_off + r, window.col_off + c] += weights[r, c]
    return total


def test_window_starts_anchor_and_shift_last_inward() -> None:
    assert window_starts(100, 32, 24) == (0, 24, 48, 68)
    assert window_starts(96, 32, 32) == (0, 32, 64)
    assert window_starts(32, 32, 24) == (0,)
    assert window_starts(10, 32, 24) == (0,)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 500), tile=st.integers(1, 64), data=st.data())
def test_window_starts_cover_exactly(length: int, tile: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    stride = tile - overlap
    starts = window_starts(length, tile, stride)
    size = min(tile, length)
    assert starts[0] == 0
    assert starts[-1] + size == length  # ends on the edge, never hangs over
    assert all(0 < b - a <= stride for a, b in pairwise(starts))
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()


def test_grid_windows_are_clipped_and_in_raster_order() -> None:
    grid = TileGrid(height=50, width=20, tile=32, overlap=8)
    windows = grid.windows()
    assert [(w.row_off, w.col_off) for _, _, w in windows] == [(0, 0), (18, 0)]
    assert all((w.height, w.width) == (32, 20) for _, _, w in windows)
    assert len(grid) == 2


@pytest.mark.parametrize(('tile', 'overlap'), [(8, 8), (8, -1), (0, 0)])
def test_grid_rejects_bad_overlap(tile: int, overlap: int) -> None:
    with pytest.raises(InputError, match='overlap|tile'):
        TileGrid(height=10, width=10, tile=tile, overlap=overlap)


def test_cosine_ramp_values() -> None:
    weights = axis_weights((0, 12, 24), 1, 16, 4, 'cosine')
    expected = [0.5 - 0.5 * math.cos(math.pi * (i + 0.5) / 4) for i in range(4)]
    np.testing.assert_allclose(weights[:4], expected, rtol=1e-6)
    np.testing.assert_allclose(weights[-4:], expected[::-1], rtol=1e-6)
    assert (weights[4:-4] == 1).all()


def test_linear_ramp_values() -> None:
    weights = axis_weights((0, 12), 0, 16, 4, 'linear')
    assert (weights[:12] == 1).all()  # no taper on the scene border side
    np.testing.assert_allclose(weights[12:], [0.875, 0.625, 0.375, 0.125])


@pytest.mark.parametrize('blend', ['linear', 'cosine', 'gaussian'])
def test_border_windows_do_not_taper_outward(blend: str) -> None:
    grid = TileGrid(height=40, width=40, tile=16, overlap=4)
    first = grid.weights(0, 0, blend)  # type: ignore[arg-type]
    bottom, right = len(grid.row_starts) - 1, len(grid.col_starts) - 1
    last = grid.weights(bottom, right, blend)  # type: ignore[arg-type]
    assert (first[:12, :12] == 1).all()  # tapers only on its inner (bottom, right) sides
    assert (first[12:, :] < 1).all() and (first[:, 12:] < 1).all()
    assert (last[4:, 4:] == 1).all()  # tapers only on its inner (top, left) sides
    assert (last[:4, :] < 1).all() and (last[:, :4] < 1).all()


def test_single_tile_is_not_down_weighted() -> None:
    grid = TileGrid(height=16, width=16, tile=16, overlap=4)
    for blend in BLENDS:
        assert (grid.weights(0, 0, blend) == 1).all()


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    tile=st.integers(2, 24),
    data=st.data(),
)
def test_weights_positive_on_every_pixel(
    height: int, width: int, tile: int, data: st.DataObject
) -> None:
    overlap = data.draw(st.integers(0, tile - 1))
    grid = TileGrid(height, width, tile, overlap)
    for blend in ('linear', 'cosine', 'gaussian'):
        for i, j, _ in grid.windows():
            assert (grid.weights(i, j, blend) > 0).all()
    # Crop-centre: every pixel belongs to exactly one window.
    assert (coverage(grid, 'none') == 1).all()


def test_crop_centre_cores_split_the_overlap_in_the_middle() -> None:
    weights = [axis_weights((0, 24, 36), k, 32, 8, 'none') for k in range(3)]
    owned = [np.flatnonzero(w) + s for w, s in zip(weights, (0, 24, 36), strict=True)]
    assert (owned[0][0], owned[0][-1]) == (0, 27)  # 32 - 8 / 2 = 28 rows for the first
    assert (owned[1][0], owned[1][-1]) == (28, 45)  # middle of the larger, shifted overlap
    assert (owned[2][0], owned[2][-1]) == (46, 67)


def test_default_overlap_is_a_quarter_tile() -> None:
    assert default_overlap(256) == 64
    assert default_overlap(30) == 7


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 400),
    tile=st.integers(2, 40),
    max_width=st.integers(1, 200),
    data=st.data(),
)
def test_strips_partition_columns_with_every_touching_window(
    width: int, tile: int, max_width: int, data: st.DataObject
) -> None:
    grid = TileGrid(10, width, tile, data.draw(st.integers(0, tile - 1)))
    strips = grid.strips(max_width)
    assert strips[0].start == 0 and strips[-1].stop == width
    assert all(a.stop == b.start for a, b in pairwise(strips))
    size = grid.window_width
    for strip in strips:
        touching = [
            j for j, s in enumerate(grid.col_starts) if s < strip.stop and s + size > strip.start
        ]
        assert list(strip.columns) == touching
        assert strip.span == (grid.col_starts[touching[0]], grid.col_starts[touching[-1]] + size)
        # One owned window column plus its halo spans less than two windows.
        assert strip.span[1] - strip.span[0] <= max(max_width, 2 * size)


def test_strips_of_a_narrow_grid_are_one() -> None:
    grid = TileGrid(10, 100, 32, 8)
    assert grid.strips(8192) == [Strip(0, 100, (0, 1, 2, 3), (0, 100))]
    strips = grid.strips(60)
    assert strips == [
        Strip(0, 48, (0, 1), (0, 56)),  # owns the columns of windows 0 and 1
        Strip(48, 68, (1, 2), (24, 80)),  # window 1 again: it touches columns 48 to 55
        Strip(68, 100, (2, 3), (48, 100)),
    ]
