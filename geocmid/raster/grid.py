"""Reading a raster on a target pixel grid: one tolerance, one warp, one validity rule.

A raster lies *on* a grid when both share the CRS and pixel size and the grid's corners fall on
whole pixels of the raster (up to :data:`GRID_TOLERANCE`); it is then read with plain windowed
reads. Otherwise it is read through a :class:`~rasterio.vrt.WarpedVRT` onto the grid
(:func:`warp_onto`), as TorchGeo's ``IntersectionDataset`` puts dataset 2 on dataset 1's grid.

Validity follows one rule everywhere (:func:`validity_of`): a nodata value (given, else the
file's), else the file's alpha band, else its GDAL mask bands, else every pixel; NaN is never
valid. A warp keeps the file's alpha band, or adds one when only masks (or nothing) mark the
data, so that the collar it creates outside the file is invalid too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geocmid.raster.files import ValidityRule, alpha_band

#: Tolerance, in pixels, for deciding that a coordinate lies on a pixel grid: float64
#: geotransforms of aligned grids differ by rounding noise, which must not add a column of nodata.
GRID_TOLERANCE = 1e-6

#: Resampling used when a raster has to be warped (bilinear suits continuous data).
GridResampling = Literal['nearest', 'bilinear', 'cubic', 'average']


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS (None for images without georeferencing), geotransform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int


def snap(value: float) -> float:
    """``value`` rounded to a whole number when it is one up to :data:`GRID_TOLERANCE`."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < GRID_TOLERANCE else value


def is_whole(value: float) -> bool:
    """Whether a pixel coordinate is whole, up to :data:`GRID_TOLERANCE`."""
    return abs(value - round(value)) < GRID_TOLERANCE


def same_resolution(a: float, b: float) -> bool:
    """Pixel sizes equal up to float noise."""
    return math.isclose(a, b, rel_tol=1e-9)


def data_bands(src: DatasetReader) -> tuple[int, ...]:
    """1-based indexes of the bands that hold data: every band but a declared alpha band."""
    alpha = alpha_band(src)
    return tuple(i for i in range(1, src.count + 1) if i != alpha)


def grid_offset(src: DatasetReader, grid: Grid) -> tuple[int, int] | None:
    """(row, column) of ``grid``'s origin in ``src``'s pixels when ``grid`` is a window of it.

    That is the case when both share the CRS and the grid's corners fall on whole pixels of
    ``src`` with the same pixel size; the window must also lie inside ``src``. Otherwise None:
    ``src`` has to be warped onto ``grid``.
    """
    if src.crs != grid.crs:
        return None
    inverse = ~src.transform
    corners = [
        inverse @ (grid.transform @ (col, row))
        for col, row in ((0, 0), (grid.width, 0), (0, grid.height))
    ]
    (col0, row0), (col1, row1), (col2, row2) = [(snap(c), snap(r)) for c, r in corners]
    whole = all(float(v).is_integer() for v in (col0, row0, col1, row1, col2, row2))
    spans = (col1 - col0, row1 - row0, col2 - col0, row2 - row0)
    same_size = spans == (grid.width, 0, 0, grid.height)
    inside = (
        0 <= col0 and 0 <= row0
        and col0 + grid.width <= src.width and row0 + grid.height <= src.height
    )  # fmt: skip
    if whole and same_size and inside:
        return int(row0), int(col0)
    return None


def validity_of(
    src: DatasetReader | WarpedVRT, indexes: Sequence[int], nodata: float | None = None
) -> ValidityRule:
    """The validity rule of ``indexes`` of ``src`` (a file or a view from :func:`warp_onto`).

    A nodata value (``nodata``, else the file's) decides first. A warped view without one is
    read through its alpha band (the file's own, or the one :func:`warp_onto` added), because
    ``read_masks`` of a view does not reflect it. A file is read through its GDAL masks.
    """
    if isinstance(src, WarpedVRT) and nodata is None and src.nodata is None:
        return ValidityRule(alpha=alpha_band(src) or src.count)
    return ValidityRule.of(src, indexes, nodata)


def warp_onto(
    src: DatasetReader,
    grid: Grid,
    *,
    nodata: float | None = None,
    resampling: GridResampling | Resampling = 'bilinear',
) -> WarpedVRT:
    """A view of ``src`` on ``grid`` through GDAL's warper (nothing is read here).

    Args:
        src: the open raster.
        grid: the target grid.
        nodata: overrides or supplies the raster's nodata value.
        resampling: how pixels are resampled.

    Returns:
        The view; read its validity with :func:`validity_of` and close it when done.
    """
    if not isinstance(resampling, Resampling):
        resampling = Resampling[resampling]
    options: dict[str, Any] = {
        'crs': grid.crs,
        'transform': grid.transform,
        'width': grid.width,
        'height': grid.height,
        'resampling': resampling,
    }
    value = src.nodata if nodata is None else nodata
    if value is not None:
        options.update(src_nodata=value, nodata=value)
    elif alpha_band(src) is None:
        # Without nodata, only an alpha band tells the warped collar from real zeros; a file's
        # own alpha band is carried through the warp (adding a second one is an error).
        options['add_alpha'] = True
    return WarpedVRT(src, **options)


class RasterOnGrid:
    """One raster read by windows of a target grid, with a per-pixel validity mask.

    Args:
        src: the open raster (closed by :meth:`close`).
        path: its file, for error messages.
        grid: the grid windows refer to.
        nodata: overrides or supplies the raster's nodata value.
        resampling: used when the raster has to be warped onto ``grid``.
        offset: (row, column) of the grid's origin in the raster's pixels, for a raster known
            to share the grid's pixels (a label without georeferencing); found from the
            georeferencing when None.
    """

    def __init__(
        self,
        src: DatasetReader,
        path: Path,
        grid: Grid,
        *,
        nodata: float | None = None,
        resampling: GridResampling | Resampling = 'bilinear',
        offset: tuple[int, int] | None = None,
    ) -> None:
        self.src = src
        self.path = path
        self.grid = grid
        self.nodata = nodata
        if offset is None:
            offset = grid_offset(src, grid)
        self.warp: WarpedVRT | None = None
        if offset is None:
            self.warp = warp_onto(src, grid, nodata=nodata, resampling=resampling)
            offset = (0, 0)
        self.row_off, self.col_off = offset
        self._rules: dict[tuple[int, ...], ValidityRule] = {}

    @property
    def warped(self) -> bool:
        """Whether the raster is resampled onto the grid (else read pixel for pixel)."""
        return self.warp is not None

    @property
    def reader(self) -> DatasetReader | WarpedVRT:
        """What windows are read from: the raster itself or its warped view."""
        return self.src if self.warp is None else self.warp

    def _window(self, window: Window) -> Window:
        if self.warp is not None or not (self.row_off or self.col_off):
            return window
        col, row = window.col_off + self.col_off, window.row_off + self.row_off
        return Window(col, row, window.width, window.height)

    def rule(self, indexes: Sequence[int]) -> ValidityRule:
        """The validity rule of ``indexes`` (see :func:`validity_of`), cached."""
        key = tuple(indexes)
        rule = self._rules.get(key)
        if rule is None:
            rule = self._rules[key] = validity_of(self.reader, key, self.nodata)
        return rule

    def read_pixels(
        self, window: Window, indexes: Sequence[int], out_dtype: str | np.dtype | None = None
    ) -> np.ndarray:
        """(C, h, w) pixels of ``indexes`` in ``window`` of the grid."""
        return self.reader.read(list(indexes), window=self._window(window), out_dtype=out_dtype)

    def read_valid(
        self, window: Window, indexes: Sequence[int], data: np.ndarray | None = None
    ) -> np.ndarray:
        """(h, w) bool validity of ``indexes`` in ``window``; ``data`` saves a re-read."""
        return self.rule(indexes).valid(self.reader, indexes, self._window(window), data)

    def read(
        self, window: Window, indexes: Sequence[int], out_dtype: str | np.dtype | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read ``indexes`` in ``window`` of the grid: (C, h, w) data and (h, w) validity."""
        data = self.read_pixels(window, indexes, out_dtype)
        return data, self.read_valid(window, indexes, data)

    def close(self) -> None:
        """Close the warp (if any) and the raster."""
        if self.warp is not None:
            self.warp.close()
        self.src.close()
