"""Windowed, normalised reads of a scene for inference, with a per-pixel validity mask."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
from rasterio.crs import CRS
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.files import BandSelection, check_bands, open_raster, require_georeferencing
from geocmid.raster.grid import Grid, RasterOnGrid, same_resolution
from geocmid.raster.normalise import normalise_window

__all__ = ('SceneReader', 'normalise_window', 'open_scene')


def open_scene(path: str | os.PathLike[str]) -> DatasetReader:
    """Open a readable, georeferenced raster (see :mod:`geocmid.raster.files`).

    Raises:
        InputError: the file is missing, unreadable or corrupt, or has no CRS or geotransform.
    """
    src = open_raster(path)
    try:
        require_georeferencing(src, path)
    except BaseException:
        src.close()
        raise
    return src


class SceneReader:
    """Reads fixed-size, normalised float32 windows of a scene and where they are valid.

    The output grid is the scene's own grid. When ``resolution`` differs from the scene's
    pixel size, the scene is read through a virtual warp (:func:`~geocmid.raster.grid.warp_onto`,
    same CRS and origin, bilinear) at that resolution: :attr:`crs`, :attr:`transform`,
    :attr:`width` and :attr:`height` then describe the warped grid, :attr:`scene` keeps the
    scene's, and writers resample their results back onto it at the end
    (``PredictionWriter(..., output_grid=reader.scene)``).

    A pixel is valid only where every selected band is valid (the one rule of
    :class:`~geocmid.raster.grid.RasterOnGrid`: ``nodata`` when given, else the file's nodata
    value, alpha or mask band; never NaN). Invalid pixels read as 0 after normalisation, the
    neutral value for the model.

    Args:
        path: the scene.
        bands: bands to read, in model channel order: 1-based indexes or band names; all
            bands when None.
        mean: per-band mean subtracted before dividing by ``std`` (in raw data units).
        std: per-band standard deviation.
        resolution: the model's ground resolution in CRS units; None keeps the scene's.
        nodata: overrides or supplies the input nodata value.

    Raises:
        InputError: for a bad scene (see :func:`open_scene`), bands or statistics.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bands: BandSelection | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resolution: float | None = None,
        nodata: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.scene = open_scene(path)
        try:
            self.bands = check_bands(path, self.scene.count, bands, self.scene.descriptions)
            count = len(self.bands)
            mean = [0.0] * count if mean is None else list(mean)
            std = [1.0] * count if std is None else list(std)
            if len(mean) != count or len(std) != count:
                raise InputError(
                    path, f'{count} band(s) selected but {len(mean)} mean and {len(std)} std values'
                )
            if any(not s > 0 for s in std):
                raise InputError(path, f'std values must be positive, got {std}')
            self.mean = np.asarray(mean, dtype=np.float32)
            self.std = np.asarray(std, dtype=np.float32)
            self.nodata = self.scene.nodata if nodata is None else nodata
            self._grid = RasterOnGrid(
                self.scene, self.path, self._target(resolution), nodata=nodata
            )
        except BaseException:
            self.scene.close()
            raise

    def _target(self, resolution: float | None) -> Grid:
        """The scene's grid, or the grid with the scene's CRS and origin at ``resolution``."""
        src = self.scene
        xres, yres = src.res
        if resolution is None or (
            same_resolution(xres, resolution) and same_resolution(yres, resolution)
        ):
            return Grid(src.crs, src.transform, src.width, src.height)
        if not resolution > 0:
            raise InputError(self.path, f'model resolution must be positive, got {resolution}')
        t = src.transform
        width = max(1, round(src.width * xres / resolution))
        height = max(1, round(src.height * yres / resolution))
        transform = Affine(
            math.copysign(resolution, t.a), 0.0, t.c, 0.0, math.copysign(resolution, t.e), t.f
        )
        return Grid(src.crs, transform, width, height)

    @property
    def source(self) -> DatasetReader | WarpedVRT:
        """What windows are read from: the scene or its warped view."""
        return self._grid.reader

    @property
    def crs(self) -> CRS:
        """CRS of the grid that windows are read on."""
        return self._grid.grid.crs

    @property
    def transform(self) -> Affine:
        """float64 geotransform of the grid that windows are read on."""
        return self._grid.grid.transform

    @property
    def height(self) -> int:
        """Height in pixels of the grid that windows are read on."""
        return self._grid.grid.height

    @property
    def width(self) -> int:
        """Width in pixels of the grid that windows are read on."""
        return self._grid.grid.width

    @property
    def warped(self) -> bool:
        """Whether the scene is read at another resolution than its own."""
        return self._grid.warped

    def read(self, window: Window, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Read one window, normalised and zero-padded to ``size``.

        Args:
            window: a window inside the grid.
            size: (height, width) to pad to at the bottom and right (the model's tile).

        Returns:
            ``(image, valid)``: float32 (C, *size) and bool (*size); the padding is invalid.
        """
        raw, valid = self._grid.read(window, self.bands)
        return normalise_window(raw, valid, self.mean, self.std, size)

    def close(self) -> None:
        """Close the virtual warp (if any) and the scene."""
        self._grid.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
