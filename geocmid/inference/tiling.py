"""Window grids over a raster and the blend weights of overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from rasterio.windows import Window

from geocmid.errors import InputError

Blend = Literal['none', 'linear', 'cosine', 'gaussian']
BLENDS: tuple[Blend, ...] = ('none', 'linear', 'cosine', 'gaussian')


def window_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Offsets of the windows along one axis, anchored at 0 and covering ``length`` exactly.

    The last window is shifted inward so that it ends on the raster edge instead of hanging
    over it (TorchGeo's centred grid hangs over both edges, see ``docs/inference.md#tiling``).
    An axis shorter than a tile gets one window at 0.

    Args:
        length: raster size along the axis, in pixels.
        tile: window size in pixels.
        stride: step between windows in pixels.

    Returns:
        Strictly increasing window offsets.
    """
    if length <= tile:
        return (0,)
    last = length - tile
    starts = list(range(0, last, stride))
    return (*starts, last)


def _ramp(length: int, blend: Blend) -> np.ndarray:
    """Rising edge of ``length`` pixels, strictly inside (0, 1], sampled at pixel centres."""
    t = (np.arange(length, dtype=np.float64) + 0.5) / length
    match blend:
        case 'linear':
            return t
        case 'cosine':
            return 0.5 - 0.5 * np.cos(np.pi * t)
        case 'gaussian':
            # Half a Gaussian that reaches 1 at the end of the overlap, sigma = overlap / 3.
            return np.exp(-0.5 * (3.0 * (1.0 - t)) ** 2)
    raise ValueError(f'unknown blend {blend!r}')


def axis_weights(
    starts: tuple[int, ...], index: int, size: int, overlap: int, blend: Blend
) -> np.ndarray:
    """1-D blend weights of window ``index`` along one axis.

    Weights never taper on a side that lies on the raster border (there is no neighbour to
    hand over to), so a pixel near the scene edge keeps full weight.

    * ``none`` is crop-centre: each pixel belongs to exactly one window, the one whose core
      contains it, with the boundary in the middle of the overlap between neighbours; the
      weight is 1 on the core and 0 elsewhere.
    * ``linear``, ``cosine`` and ``gaussian`` ramp up over the first ``overlap`` pixels and
      down over the last ones (interior sides only) and are 1 in between; they are strictly
      positive, so every covered pixel has a positive total weight.

    Args:
        starts: all window offsets along the axis (from :func:`window_starts`).
        index: which window.
        size: window size along the axis (the tile, or the raster size when smaller).
        overlap: nominal overlap in pixels.
        blend: blend mode.

    Returns:
        float32 array of length ``size``.
    """
    weights = np.ones(size, dtype=np.float64)
    first, last = index == 0, index == len(starts) - 1
    if blend == 'none':
        lo = 0 if first else (starts[index - 1] + size + starts[index]) // 2 - starts[index]
        hi = size if last else (starts[index] + size + starts[index + 1]) // 2 - starts[index]
        weights[:] = 0.0
        weights[lo:hi] = 1.0
        return weights.astype(np.float32)
    ramp_length = min(overlap, size // 2)
    if ramp_length > 0:
        ramp = _ramp(ramp_length, blend)
        if not first:
            weights[:ramp_length] = ramp
        if not last:
            weights[size - ramp_length :] = ramp[::-1]
    return weights.astype(np.float32)


@dataclass(frozen=True)
class Strip:
    """A vertical strip of a grid, processed on its own so memory stays bounded on wide scenes.

    Attributes:
        start: first output column the strip owns.
        stop: one past its last output column.
        columns: indexes of the window columns that touch the owned columns; those on the left
            edge also belong to the previous strip (a halo computed twice).
        span: (first, one past last) raster column covered by those windows.
    """

    start: int
    stop: int
    columns: tuple[int, ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class TileGrid:
    """Windows of ``tile`` pixels every ``tile - overlap`` pixels over a raster, in raster order.

    The grid is anchored to the raster origin (pixel 0, 0), so a pixel's windows do not depend
    on any processing extent. Windows are clipped to the raster: rasters smaller than a tile
    get windows of the raster's size, which the reader pads up to the tile.

    Args:
        height: raster height in pixels.
        width: raster width in pixels.
        tile: window size in pixels.
        overlap: overlap between neighbouring windows in pixels, ``0 <= overlap < tile``.

    Raises:
        InputError: for a tile or overlap that makes no grid.
    """

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            size = f'{self.height} x {self.width}'
            raise InputError(None, f'raster size must be positive, got {size}')
        if self.tile < 1:
            raise InputError(None, f'tile must be a positive number of pixels, got {self.tile}')
        if not 0 <= self.overlap < self.tile:
            raise InputError(
                None, f'overlap must be in [0, tile), got {self.overlap} for tile {self.tile}'
            )

    @property
    def stride(self) -> int:
        """Step between neighbouring windows in pixels."""
        return self.tile - self.overlap

    @property
    def window_height(self) -> int:
        """Height of every window (the tile, or the raster height when smaller)."""
        return min(self.tile, self.height)

    @property
    def window_width(self) -> int:
        """Width of every window (the tile, or the raster width when smaller)."""
        return min(self.tile, self.width)

    @cached_property
    def row_starts(self) -> tuple[int, ...]:
        """Row offsets of the window rows."""
        return window_starts(self.height, self.tile, self.stride)

    @cached_property
    def col_starts(self) -> tuple[int, ...]:
        """Column offsets of the window columns."""
        return window_starts(self.width, self.tile, self.stride)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def windows(self, columns: Sequence[int] | None = None) -> list[tuple[int, int, Window]]:
        """Windows in raster order (row by row) as ``(row index, column index, window)``.

        Args:
            columns: only these window columns (e.g. a :class:`Strip`'s); all when None.
        """
        columns = range(len(self.col_starts)) if columns is None else columns
        return [
            (i, j, Window(self.col_starts[j], row, self.window_width, self.window_height))
            for i, row in enumerate(self.row_starts)
            for j in columns
        ]

    def strips(self, max_width: int) -> list[Strip]:
        """Split the grid into vertical strips whose windows span at most ``max_width`` columns.

        Every output column is owned by exactly one strip, and a strip holds every window that
        touches its columns, so blending each strip on its own gives the same result as
        blending the whole grid. A strip always holds at least one window column, so a
        ``max_width`` below the window width still makes progress.

        Args:
            max_width: the widest span of one strip, in pixels.

        Returns:
            Strips from left to right; one strip when the whole grid fits.
        """
        starts, size = self.col_starts, self.window_width

        def strip(first: int, last: int) -> Strip:
            start = 0 if first == 0 else starts[first]
            stop = self.width if last == len(starts) - 1 else starts[last + 1]
            columns = tuple(j for j, s in enumerate(starts) if s < stop and s + size > start)
            return Strip(start, stop, columns, (starts[columns[0]], starts[columns[-1]] + size))

        strips, first = [], 0
        while first < len(starts):
            last = first
            while last + 1 < len(starts) and _width(strip(first, last + 1).span) <= max_width:
                last += 1
            strips.append(strip(first, last))
            first = last + 1
        return strips

    def weights(self, row_index: int, col_index: int, blend: Blend) -> np.ndarray:
        """Blend weights (window_height, window_width) of one window; see :func:`axis_weights`."""
        rows = axis_weights(self.row_starts, row_index, self.window_height, self.overlap, blend)
        cols = axis_weights(self.col_starts, col_index, self.window_width, self.overlap, blend)
        return np.outer(rows, cols)


def _width(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def default_overlap(tile: int) -> int:
    """The default overlap: a quarter of the tile, as in ArcGIS's padding default."""
    return math.floor(tile / 4)
