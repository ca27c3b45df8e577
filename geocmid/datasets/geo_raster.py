"""A TorchGeo ``GeoDataset`` over a folder (or list) of georeferenced rasters."""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import rasterio
import shapely
import torch
from geopandas import GeoDataFrame
from pyproj import CRS as ProjCRS
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.transform import Affine, from_origin
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from torch import Tensor
from torchgeo.datasets import GeoDataset
from torchgeo.datasets.utils import GeoSlice, Sample, disambiguate_timestamp

from geocmid.errors import InputError
from geocmid.raster.bands import COLOUR_NAMES
from geocmid.raster.extent_index import ExtentIndex
from geocmid.raster.files import (
    BandSelection,
    PathLike,
    ValidityRule,
    check_bands,
    find_rasters,
    open_raster,
    raster_band_stats,
    require_georeferencing,
)
from geocmid.raster.grid import (
    GRID_TOLERANCE,
    Grid,
    is_whole,
    same_resolution,
    validity_of,
    warp_onto,
)
from geocmid.raster.locations import remote_env
from geocmid.raster.stats import (
    BandStats,
    default_sidecar,
    fingerprint,
    json_number,
    load_cached,
    store_cached,
)
from geocmid.raster.units import crs_units_to_metres

#: How sample images are typed: 'float32', or 'native' (the files' own dtype, cast on the
#: device after the batch transfer).
type ImageDtype = Literal['float32', 'native']

#: How training reads raster patches, pretraining and fine-tuning alike (``bench/loader.py``
#: measures it): in the files' dtype, a quarter of the bytes of float32 for 8-bit imagery to
#: collate, pin and copy to the GPU, and without ``valid`` where the nodata value implies it;
#: :func:`restore_on_device` casts the batch and rebuilds ``valid`` after the transfer.
DEVICE_READ: dict[str, Any] = {'dtype': 'native', 'omit_implied_valid': True}


@dataclass(frozen=True)
class RasterSource:
    """One input raster as validated at construction; enough to plan reads without opening it."""

    path: Path
    crs: CRS
    transform: Affine
    width: int
    height: int
    count: int
    indexes: tuple[int, ...]
    dtypes: tuple[str, ...]
    rule: ValidityRule
    descriptions: tuple[str | None, ...]
    interval: tuple[pd.Timestamp, pd.Timestamp]
    #: GDAL colour interpretation of each band: 'red', 'green', 'blue', or None for others.
    colours: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where a raster lies on the dataset's pixel grid, in whole pixels.

    Attributes:
        col: column of its upper-left pixel on the dataset grid.
        row: row of its upper-left pixel on the dataset grid.
        width: columns it spans on the dataset grid.
        height: rows it spans on the dataset grid.
        warp: whether it must be reprojected or resampled to get there (through a WarpedVRT);
            False means it already lies on the grid and is read as is.
    """

    col: int
    row: int
    width: int
    height: int
    warp: bool


class GeoRasterDataset(GeoDataset):
    """Georeferenced rasters of any band count and dtype, read on one pixel grid.

    Takes a folder (searched recursively, see
    :data:`~geocmid.raster.files.RASTER_SUFFIXES`) or a list of files and folders. Every file
    is validated up front (readable, not truncated, has a CRS and geotransform, the band
    selection exists), raising :class:`~geocmid.errors.InputError` naming the file.

    **Target grid.** Unless ``crs`` is given, the dataset uses the CRS shared by the most
    files (ties go to the file that sorts first). Unless ``res`` is given, it uses the finest
    resolution (smallest pixel area) among the files in that CRS, or, when none is, among all
    files after reprojection. The grid is anchored on the first file already on such a grid,
    so that file and every file aligned with it are read directly with windowed reads; other
    files (another CRS, resolution, or a shifted or rotated grid) are read through a cached
    ``WarpedVRT`` onto the same grid.

    **Samples** are dicts of tensors, like TorchGeo's ``RasterDataset``:

    * ``image``: (C, H, W), float32, or with ``dtype='native'`` in the files' (common) dtype:
      uint8 stays uint8. Native samples are for consumers that cast and normalise on the
      device after the batch transfer: for 8-bit data they are a quarter of the bytes to
      convert, collate, pin and copy to the GPU, and the host skips the conversion;
    * ``valid``: bool (H, W), True where every selected band holds data; pixels covered by no
      file are invalid and hold the nodata value (or 0 without one). With
      ``omit_implied_valid=True`` it is left out whenever the image implies it exactly: when
      :attr:`sentinel` is set and the image dtype holds the read values exactly (native, or
      8- and 16-bit integers or float32 read as float32). Consumers rebuild it with
      :func:`valid_from_sentinel` on the device after the batch transfer, where it costs
      nothing measurable, instead of the host spending a quarter of a cached read on it
      (see BENCHMARKS.md);
    * ``bounds``: [xmin, xmax, xres, ymin, ymax, yres, tmin, tmax, tres] and ``transform``:
      the 9 affine coefficients, both **float64** (TorchGeo's float32 loses up to a pixel in
      UTM northings, ``docs/data.md#samples``).

    ``sentinel`` is the value that marks exactly the invalid pixels of every sample (a pixel
    is invalid where some band holds it), when there is one: every file's validity is the
    same nodata value and the pixels no file covers are filled with it. Else it is None.

    Where files overlap, the first one (by path) with a valid pixel wins, as in
    ``rasterio.merge``'s default. Open files are cached per process (never pickled, reopened
    after a fork), so the dataset works with any number of DataLoader workers.

    **Statistics** (``mean``, ``std``, ``stats``) are computed on first use from sampled
    blocks, excluding invalid pixels, and cached in a JSON sidecar (see
    :func:`~geocmid.raster.stats.default_sidecar`) keyed by the files' paths, sizes and
    modification times, the band selection, nodata and the sampling budget.

    Subclasses may set ``filename_regex`` with a ``date`` group (or ``start`` and ``stop``)
    and ``date_format`` to date the files, as with TorchGeo's ``RasterDataset``.
    """

    filename_regex = '.*'
    date_format = '%Y%m%d'

    def __init__(
        self,
        paths: PathLike | Iterable[PathLike],
        *,
        bands: BandSelection | None = None,
        crs: CRS | ProjCRS | str | None = None,
        res: float | tuple[float, float] | None = None,
        nodata: float | None = None,
        max_nodata_fraction: float = 0.5,
        resampling: Resampling = Resampling.bilinear,
        transforms: Callable[[Sample], Sample] | None = None,
        dtype: ImageDtype = 'float32',
        omit_implied_valid: bool = False,
        stats_path: PathLike | None = None,
        stats_max_pixels: int = 2**22,
        max_open_files: int = 64,
    ) -> None:
        """Initialise a new GeoRasterDataset.

        Args:
            paths: a raster, a folder of rasters, or several of either.
            bands: 1-based band indexes or band names (matched against the band
                descriptions of each file); default every band.
            crs: target CRS (default: the CRS of most files).
            res: target resolution in CRS units, one value or (x, y) (default: the finest
                among the files in the target CRS).
            nodata: value marking missing data in every file, overriding the files' own.
            max_nodata_fraction: largest share of invalid pixels in a training patch, honoured
                by :class:`~geocmid.samplers.valid_patch.ValidPatchSampler`.
            resampling: resampling used where files are reprojected or resampled.
            transforms: a function applied to each sample.
            dtype: 'float32' images, or 'native' ones in the files' common dtype (see above).
            omit_implied_valid: leave ``valid`` out of the samples when their images imply
                it exactly (see above).
            stats_path: statistics sidecar (default: beside the data, see
                :func:`~geocmid.raster.stats.default_sidecar`).
            stats_max_pixels: pixel budget for computing statistics over all files.
            max_open_files: open files kept per process (least recently used are closed).

        Raises:
            InputError: a path is missing or empty, a file is unreadable, corrupt, without CRS
                or geotransform, the band selection does not exist in a file, the files
                have different band counts, or ``max_nodata_fraction`` or ``dtype`` is invalid.
        """
        if not 0 <= max_nodata_fraction < 1:
            raise InputError(
                None, f'max_nodata_fraction must be in [0, 1), got {max_nodata_fraction}'
            )
        if dtype not in get_args(ImageDtype.__value__):
            raise InputError(None, f"dtype must be 'float32' or 'native', got {dtype!r}")
        self.paths = paths
        self.roots = (
            [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
        )
        self.nodata_override = nodata
        self.max_nodata_fraction = max_nodata_fraction
        self.resampling = resampling
        self.transforms = transforms
        # Not ``self.dtype``: TorchGeo's RasterDataset uses that name for a torch dtype.
        self._native = dtype == 'native'
        self.stats_path = None if stats_path is None else Path(stats_path)
        self.stats_max_pixels = stats_max_pixels
        self.max_open_files = max_open_files
        self.sources = [self._inspect(path, bands) for path in find_rasters(paths)]
        self._check_band_counts()

        # Pixels are read in their own dtype: validity is decided on the exact stored values,
        # and torch converts to float32 faster than GDAL does while reading.
        self._read_dtype = np.result_type(*{d for source in self.sources for d in source.dtypes})
        self.nodata = self._common_nodata()
        self._fill = self._fill_value()
        self.sentinel = self._sentinel()
        exact = self._native or np.can_cast(self._read_dtype, np.float32)
        self._omit_valid = omit_implied_valid and self.sentinel is not None and exact
        self._stats: BandStats | None = None
        self._readers: OrderedDict[
            int, tuple[DatasetReader, DatasetReader | WarpedVRT, ValidityRule]
        ] = OrderedDict()
        self._pid = os.getpid()
        self._plan(crs, res)

    # -- construction -----------------------------------------------------------------

    def _inspect(self, path: Path, bands: BandSelection | None) -> RasterSource:
        """Validate one file and record what planning and reading need."""
        with open_raster(path) as src:
            require_georeferencing(src, path)
            indexes = check_bands(path, src.count, bands, src.descriptions)
            return RasterSource(
                path=path,
                crs=src.crs,
                transform=src.transform,
                width=src.width,
                height=src.height,
                count=src.count,
                indexes=indexes,
                dtypes=tuple(src.dtypes[i - 1] for i in indexes),
                rule=ValidityRule.of(src, indexes, self.nodata_override),
                descriptions=tuple(src.descriptions[i - 1] for i in indexes),
                interval=self._interval(path),
                colours=tuple(COLOUR_NAMES.get(src.colorinterp[i - 1]) for i in indexes),
            )

    def _interval(self, path: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
        """Time span of a file from its name (``filename_regex``); unbounded by default."""
        match = re.match(self.filename_regex, path.name, re.VERBOSE)
        groups = match.groupdict() if match else {}
        if groups.get('date'):
            return disambiguate_timestamp(groups['date'], self.date_format)
        if groups.get('start') and groups.get('stop'):
            return (
                disambiguate_timestamp(groups['start'], self.date_format)[0],
                disambiguate_timestamp(groups['stop'], self.date_format)[1],
            )
        return pd.Timestamp.min, pd.Timestamp.max

    def _check_band_counts(self) -> None:
        """Mosaicking needs the same number of selected bands in every file."""
        first = self.sources[0]
        for source in self.sources[1:]:
            if len(source.indexes) != len(first.indexes):
                raise InputError(
                    source.path,
                    f'has {len(source.indexes)} selected band(s) but {first.path.name} has '
                    f'{len(first.indexes)}; select common bands',
                )

    def _common_nodata(self) -> float | None:
        """The nodata value shared by every file (or the override), else None."""
        if self.nodata_override is not None:
            return self.nodata_override
        values = {source.rule.nodata for source in self.sources}
        if len(values) == 1:
            return values.pop()
        if all(v is not None and math.isnan(v) for v in values):
            return math.nan
        return None

    def _fill_value(self) -> float:
        """Value of pixels that no file covers: nodata when the read dtype can hold it."""
        if self.nodata is None:
            return 0
        if self._read_dtype.kind == 'f':
            return self.nodata
        limits = np.iinfo(self._read_dtype)
        if float(self.nodata).is_integer() and limits.min <= self.nodata <= limits.max:
            return self.nodata
        return 0

    def _sentinel(self) -> float | None:
        """The value marking exactly the invalid pixels of every sample, if there is one.

        There is one when every file's validity is the same nodata value (not masks or alpha
        bands, which values cannot express) and the pixels no file covers are filled with it.
        In a mosaic a pixel is then taken, all bands at once, only from a file where it is
        valid, so a read pixel is invalid exactly where some band holds the value.
        """
        if self.nodata is None:  # masks, alpha bands or different nodata values decide
            return None
        if self._fill == self.nodata or (math.isnan(self._fill) and math.isnan(self.nodata)):
            return self.nodata
        return None  # the fill stands in for a nodata value the read dtype cannot hold

    def _plan(
        self, crs: CRS | ProjCRS | str | None, res: float | tuple[float, float] | None
    ) -> None:
        """Choose the target grid and place every file on it; rebuild the index."""
        self.close()
        target = CRS.from_user_input(crs) if crs is not None else self._majority_crs()
        if res is None:
            native = [(s, _resolution_in(s, target)) for s in self.sources]
            in_target = [r for s, r in native if s.crs == target] or [r for _, r in native]
            res = min(in_target, key=lambda r: r[0] * r[1])
        xres, yres = (float(res), float(res)) if isinstance(res, int | float) else map(float, res)
        anchor = next(
            (
                s.transform
                for s in self.sources
                if s.crs == target
                and _on_axes(s.transform)
                and same_resolution(s.transform.a, xres)
                and same_resolution(-s.transform.e, yres)
            ),
            from_origin(0.0, 0.0, xres, yres),
        )
        self.grid = Affine(xres, 0.0, anchor.c, 0.0, -yres, anchor.f)
        self.target_crs = target
        self.placements = [self._place(source) for source in self.sources]

        x0, y0 = self.grid.c, self.grid.f
        cols = np.array([[p.col, p.col + p.width] for p in self.placements], dtype=np.float64)
        rows = np.array([[p.row, p.row + p.height] for p in self.placements], dtype=np.float64)
        left, right = x0 + cols[:, 0] * xres, x0 + cols[:, 1] * xres
        top, bottom = y0 - rows[:, 0] * yres, y0 - rows[:, 1] * yres
        self._files = ExtentIndex(list(zip(left, bottom, right, top, strict=True)))
        intervals = pd.IntervalIndex.from_tuples(
            [s.interval for s in self.sources], closed='both', name='datetime'
        )
        self._tmin = intervals.left.values
        self._tmax = intervals.right.values
        self.index = GeoDataFrame(
            {'filepath': [str(s.path) for s in self.sources]},
            index=intervals,
            geometry=shapely.box(left, bottom, right, top),
            crs=ProjCRS.from_user_input(target.to_wkt()),
        )
        self._res = (xres, yres)
        self._bounds = (
            slice(float(left.min()), float(right.max()), xres),
            slice(float(bottom.min()), float(top.max()), yres),
            slice(intervals.left.min(), intervals.right.max(), 1),
        )
        self._time_span = (self._bounds[2].start.timestamp(), self._bounds[2].stop.timestamp())

    def _majority_crs(self) -> CRS:
        """The CRS shared by the most files; ties go to the file that sorts first."""
        groups: list[tuple[CRS, int]] = []
        for source in self.sources:
            for k, (crs, count) in enumerate(groups):
                if crs == source.crs:
                    groups[k] = (crs, count + 1)
                    break
            else:
                groups.append((source.crs, 1))
        return max(groups, key=lambda group: group[1])[0]

    def _place(self, source: RasterSource) -> Placement:
        """Where ``source`` lands on the grid, and whether it must be warped to land there."""
        xres, yres = self.grid.a, -self.grid.e
        x0, y0 = self.grid.c, self.grid.f
        t = source.transform
        same_crs = source.crs == self.target_crs
        if same_crs and _on_axes(t) and same_resolution(t.a, xres) and same_resolution(-t.e, yres):
            col, row = (t.c - x0) / xres, (y0 - t.f) / yres
            if is_whole(col) and is_whole(row):
                return Placement(round(col), round(row), source.width, source.height, warp=False)
        left, bottom, right, top = _extent(source)
        if source.crs != self.target_crs:
            left, bottom, right, top = transform_bounds(
                source.crs, self.target_crs, left, bottom, right, top, densify_pts=21
            )
        # Snap outwards to the grid so the warped view covers the whole file.
        col0 = math.floor((left - x0) / xres + GRID_TOLERANCE)
        col1 = math.ceil((right - x0) / xres - GRID_TOLERANCE)
        row0 = math.floor((y0 - top) / yres + GRID_TOLERANCE)
        row1 = math.ceil((y0 - bottom) / yres - GRID_TOLERANCE)
        return Placement(col0, row0, max(col1 - col0, 1), max(row1 - row0, 1), warp=True)

    # -- GeoDataset interface -------------------------------------------------------------

    @property
    def crs(self) -> ProjCRS:
        """CRS of the dataset (a pyproj CRS, as in TorchGeo)."""
        return self.index.crs

    @crs.setter
    def crs(self, new_crs: ProjCRS | CRS | str) -> None:
        """Re-plan the dataset on ``new_crs`` (e.g. when used in an ``IntersectionDataset``)."""
        if CRS.from_user_input(new_crs) != self.target_crs:
            self._plan(new_crs, None)

    @property
    def res(self) -> tuple[float, float]:
        """(x, y) resolution of the dataset grid in CRS units."""
        return self._res

    @res.setter
    def res(self, new_res: float | tuple[float, float]) -> None:
        """Re-plan the dataset at ``new_res``."""
        if isinstance(new_res, int | float):
            new_res = (float(new_res), float(new_res))
        if tuple(new_res) != self._res:
            self._plan(self.target_crs, new_res)

    @property
    def bounds(self) -> tuple[slice, slice, slice]:
        """x, y and t extent of the dataset (precomputed: queried on every sample)."""
        return self._bounds

    @property
    def ground_resolution(self) -> float:
        """Pixel size in metres (x direction; see :mod:`geocmid.raster.units`)."""
        x, y, _ = self._bounds
        bounds = (x.start, y.start, x.stop, y.stop)
        return crs_units_to_metres(self._res[0], self.target_crs, bounds)

    @property
    def files(self) -> list[str]:
        """The rasters of the dataset, sorted."""
        return [str(source.path) for source in self.sources]

    @property
    def band_indexes(self) -> tuple[int, ...]:
        """Selected band indexes (1-based) of the first file."""
        return self.sources[0].indexes

    @property
    def band_names(self) -> tuple[str, ...]:
        """Names of the selected bands.

        The first file's descriptions, else its colour interpretation ('red', 'green', 'blue'),
        else 'band_<index>'.
        """
        first = self.sources[0]
        colours = first.colours or (None,) * len(first.indexes)
        return tuple(
            name or colour or f'band_{index}'
            for name, colour, index in zip(first.descriptions, colours, first.indexes, strict=True)
        )

    def __getitem__(self, index: GeoSlice) -> Sample:
        """Read the patch at ``index``.

        Args:
            index: [xmin:xmax:xres, ymin:ymax:yres, tmin:tmax:tres]; missing parts default to
                the dataset's bounds and resolution.

        Returns:
            A sample with ``image``, ``valid`` (unless left out, see ``omit_implied_valid``),
            ``bounds`` and ``transform``.

        Raises:
            IndexError: no file overlaps ``index``.
        """
        x, y, t = self._resolve(index)
        hits = self._overlapping(x, y, t)
        if not hits:
            raise IndexError(f'index: {index} not found in dataset with bounds: {self.bounds}')
        width = round((x.stop - x.start) / x.step)
        height = round((y.stop - y.start) / y.step)
        col = (x.start - self.grid.c) / self._res[0]
        row = (self.grid.f - y.stop) / self._res[1]
        transform = (x.step, 0.0, x.start, 0.0, -y.step, y.stop, 0.0, 0.0, 1.0)
        on_grid = (
            same_resolution(x.step, self._res[0])
            and same_resolution(y.step, self._res[1])
            and is_whole(col)
            and is_whole(row)
        )
        if on_grid:
            data, valid = self._read_on_grid(hits, round(col), round(row), width, height)
        else:
            data, valid = self._read_resampled(hits, Affine(*transform[:6]), width, height)

        if t is self._bounds[2]:
            t_start, t_stop = self._time_span
        else:
            t_start, t_stop = pd.Timestamp(t.start).timestamp(), pd.Timestamp(t.stop).timestamp()
        image = torch.from_numpy(data)
        bounds = (x.start, x.stop, x.step, y.start, y.stop, y.step, t_start, t_stop, t.step)
        sample: Sample = {
            'image': image if self._native else image.to(torch.float32),
            'bounds': torch.from_numpy(np.array(bounds, dtype=np.float64)),
            'transform': torch.from_numpy(np.array(transform, dtype=np.float64)),
        }
        if not self._omit_valid:
            assert valid is not None  # only single reads skip it, and only when omitted
            sample['valid'] = torch.from_numpy(valid)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def _resolve(self, index: GeoSlice) -> tuple[slice, slice, slice]:
        """Fill in the parts of ``index`` left open (bounds, resolution, time).

        The (x, y) slices that samplers yield skip TorchGeo's general ``_disambiguate_slice``:
        on the per-patch path every microsecond counts (see BENCHMARKS.md).
        """
        if isinstance(index, tuple) and len(index) == 2:
            x, y = index
            if x.step is None and y.step is None and None not in (x.start, x.stop, y.start, y.stop):
                return (
                    slice(x.start, x.stop, self._res[0]),
                    slice(y.start, y.stop, self._res[1]),
                    self._bounds[2],
                )
        return self._disambiguate_slice(index)

    def _overlapping(self, x: slice, y: slice, t: slice) -> list[int]:
        """Indexes of the files whose extent and time span overlap the query, in file order.

        An :class:`ExtentIndex` lookup: much cheaper per sample than a GeoDataFrame query.
        """
        hits = self._files.overlapping(x.start, y.start, x.stop, y.stop)
        if t is not self._bounds[2]:
            start, stop = (pd.Timestamp(t.start).to_datetime64(),
                           pd.Timestamp(t.stop).to_datetime64())  # fmt: skip
            hits = [i for i in hits if self._tmin[i] <= stop and self._tmax[i] >= start]
        return hits

    # -- reading ------------------------------------------------------------------------

    def read_window(self, i: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and validity of file ``i`` in ``window``, on the dataset grid.

        Args:
            i: file index (position in :attr:`sources`).
            window: integer window relative to the file's :class:`Placement`, inside it.

        Returns:
            (C, H, W) data in the files' common dtype and the (H, W) bool validity.
        """
        _, reader, rule = self._handles(i)
        data = reader.read(self.sources[i].indexes, window=window)
        if data.dtype != self._read_dtype:  # only in mosaics of mixed dtypes
            data = data.astype(self._read_dtype)
        return data, rule.valid(reader, self.sources[i].indexes, window, data)

    def read_pixels(self, i: int, window: Window) -> np.ndarray:
        """(C, H, W) pixels of file ``i`` in ``window``, in the files' common dtype."""
        data = self._reader(i).read(self.sources[i].indexes, window=window)
        if data.dtype != self._read_dtype:  # only in mosaics of mixed dtypes
            data = data.astype(self._read_dtype)
        return data

    def read_valid(self, i: int, window: Window) -> np.ndarray:
        """(H, W) bool validity of file ``i`` in ``window`` (see :meth:`read_window`)."""
        _, reader, rule = self._handles(i)
        return rule.valid(reader, self.sources[i].indexes, window)

    def read_valid_coarse(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        """(rows, cols) bool validity of file ``i`` read at a coarse ``shape``.

        Covers its whole placement in one decimated read, which GDAL serves from the nearest
        overview (or the internal mask's overview) when there is one, else by reading one pixel
        per cell.

        Used for remote files, whose full validity would mean downloading them whole.
        """
        _, reader, rule = self._handles(i)
        indexes = list(self.sources[i].indexes)
        if rule.alpha is not None:
            return reader.read(rule.alpha, out_shape=shape) > 0
        if rule.masks:
            read = indexes[:1] if rule.per_dataset else indexes
            return reader.read_masks(read, out_shape=(len(read), *shape)).all(axis=0)
        data = reader.read(indexes, out_shape=(len(indexes), *shape))
        return rule.valid(reader, indexes, None, data)

    def _read_on_grid(
        self, hits: list[int], col: int, row: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read a patch lying on the dataset grid with plain windowed reads.

        The validity is None when the patch lies inside one file and samples leave it out.
        """
        if len(hits) == 1:  # most patches: inside one file, read as is
            p = self.placements[hits[0]]
            inside = p.col <= col and col + width <= p.col + p.width
            if inside and p.row <= row and row + height <= p.row + p.height:
                window = Window(col - p.col, row - p.row, width, height)
                if self._omit_valid:
                    return self.read_pixels(hits[0], window), None
                return self.read_window(hits[0], window)
        data, valid = self._blank(height, width)
        for i in hits:
            p = self.placements[i]
            c0, c1 = max(col, p.col), min(col + width, p.col + p.width)
            r0, r1 = max(row, p.row), min(row + height, p.row + p.height)
            if c0 >= c1 or r0 >= r1:  # touches the patch by float noise only
                continue
            part, part_valid = self.read_window(i, Window(c0 - p.col, r0 - p.row, c1 - c0, r1 - r0))
            rows, cols = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
            _paste(data[:, rows, cols], valid[rows, cols], part, part_valid)
        return data, valid

    def _read_resampled(
        self, hits: list[int], transform: Affine, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read a patch off the dataset grid (another resolution or a fractional offset).

        Rare (TorchGeo's samplers and ours stay on the grid), so each file is warped straight
        from its source onto the patch grid through a throw-away WarpedVRT.
        """
        data, valid = self._blank(height, width)
        for i in hits:
            source = self.sources[i]
            src = self._handles(i)[0]
            grid = Grid(self.target_crs, transform, width, height)
            with self._warped(src, source, grid) as vrt:
                part = vrt.read(source.indexes).astype(self._read_dtype, copy=False)
                rule = validity_of(vrt, source.indexes, source.rule.nodata)
                part_valid = rule.valid(vrt, source.indexes, None, part)
            _paste(data, valid, part, part_valid)
        return data, valid

    def _blank(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """An all-invalid patch filled with the fill value."""
        bands = len(self.sources[0].indexes)
        data = np.full((bands, height, width), self._fill, dtype=self._read_dtype)
        return data, np.zeros((height, width), dtype=bool)

    def _warped(self, src: DatasetReader, source: RasterSource, grid: Grid) -> WarpedVRT:
        """A view of ``src`` on ``grid`` (see :func:`~geocmid.raster.grid.warp_onto`)."""
        return warp_onto(src, grid, nodata=source.rule.nodata, resampling=self.resampling)

    def _reader(self, i: int) -> DatasetReader | WarpedVRT:
        """The cached reader of file ``i`` on the dataset grid."""
        return self._handles(i)[1]

    def _handles(self, i: int) -> tuple[DatasetReader, DatasetReader | WarpedVRT, ValidityRule]:
        """File ``i`` opened in this process (LRU cache).

        Returns the file, its view on the dataset grid and the validity rule of that view.
        """
        if self._pid != os.getpid():
            # A forked worker inherited the parent's GDAL handles: never share them.
            self._readers = OrderedDict()
            self._pid = os.getpid()
        handles = self._readers.get(i)
        if handles is not None:
            self._readers.move_to_end(i)
            return handles
        source, p = self.sources[i], self.placements[i]
        with remote_env(source.path):
            src = rasterio.open(source.path)  # validated by open_raster at construction
        reader: DatasetReader | WarpedVRT = src
        rule = source.rule
        if p.warp:
            x0, y0 = self.grid @ (p.col, p.row)
            transform = Affine(self.grid.a, 0.0, x0, 0.0, self.grid.e, y0)
            reader = self._warped(src, source, Grid(self.target_crs, transform, p.width, p.height))
            rule = validity_of(reader, source.indexes, source.rule.nodata)
        self._readers[i] = (src, reader, rule)
        while len(self._readers) > self.max_open_files:
            _, (old_src, old_reader, _) = self._readers.popitem(last=False)
            old_reader.close()
            old_src.close()
        return self._readers[i]

    def close(self) -> None:
        """Close the files this process has open (they reopen on the next read)."""
        for src, reader, _ in getattr(self, '_readers', {}).values():
            reader.close()
            src.close()
        self._readers = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open files: each worker process opens its own."""
        state = self.__dict__.copy()
        state['_readers'] = OrderedDict()
        return state

    # -- statistics -----------------------------------------------------------------------

    @property
    def stats(self) -> BandStats:
        """Per-band statistics of the valid pixels (computed once, cached in a sidecar)."""
        if self._stats is None:
            self._stats = self._load_or_compute_stats()
        return self._stats

    @property
    def mean(self) -> Tensor:
        """Per-band mean, float32 (C,), for normalisation."""
        return torch.tensor(self.stats.mean, dtype=torch.float32)

    @property
    def std(self) -> Tensor:
        """Per-band standard deviation, float32 (C,); constant bands get 1 (centred only)."""
        std = self.stats.std
        return torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32)

    def _load_or_compute_stats(self) -> BandStats:
        """Statistics from the sidecar when its key matches, else computed and stored."""
        files = [source.path for source in self.sources]
        settings = {
            'bands': [list(source.indexes) for source in self.sources],
            'nodata': json_number(self.nodata_override),
            'max_pixels': self.stats_max_pixels,
        }
        digest, key = fingerprint(files, settings)
        sidecar = self.stats_path or default_sidecar(files, self.roots)
        cached = load_cached(sidecar, digest)
        if cached is not None:
            return cached
        per_file = max(1, self.stats_max_pixels // len(self.sources))
        rng = np.random.default_rng(0)
        total = BandStats.empty(len(self.sources[0].indexes))
        for source in self.sources:
            with open_raster(source.path) as src:
                part = raster_band_stats(src, source.indexes, source.rule, per_file, rng)
            total = total.merge(part)
        store_cached(sidecar, digest, key, total)
        return total


def _paste(data: np.ndarray, valid: np.ndarray, part: np.ndarray, part_valid: np.ndarray) -> None:
    """Copy the valid pixels of ``part`` where ``data`` has none yet (first valid wins)."""
    take = part_valid & ~valid
    data[:, take] = part[:, take]
    valid |= take


def _extent(source: RasterSource) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a raster in its own CRS, rotated grids included."""
    t, width, height = source.transform, source.width, source.height
    xs, ys = zip(
        *(t @ corner for corner in [(0, 0), (width, 0), (0, height), (width, height)]), strict=True
    )
    return min(xs), min(ys), max(xs), max(ys)


def _resolution_in(source: RasterSource, crs: CRS) -> tuple[float, float]:
    """The file's pixel size in ``crs``: native when already there, else GDAL's estimate."""
    t = source.transform
    if source.crs == crs:
        return math.hypot(t.a, t.d), math.hypot(t.b, t.e)
    left, bottom, right, top = _extent(source)
    transform, _, _ = calculate_default_transform(
        source.crs, crs, source.width, source.height, left, bottom, right, top
    )
    return abs(transform.a), abs(transform.e)


def _on_axes(transform: Affine) -> bool:
    """North-up, unrotated: x grows with columns, y falls with rows."""
    return transform.b == 0 and transform.d == 0 and transform.a > 0 and transform.e < 0


def valid_from_sentinel(image: Tensor, sentinel: float) -> Tensor:
    """Validity of images whose invalid pixels hold ``sentinel`` in some band.

    Rebuilds the ``valid`` that :class:`GeoRasterDataset` leaves out of its samples with
    ``omit_implied_valid=True`` (pass its :attr:`~GeoRasterDataset.sentinel`), typically on a
    batch already on the device.

    Args:
        image: (..., C, H, W) images as the dataset returned them, in any dtype.
        sentinel: the value marking invalid pixels; NaN matches NaN.

    Returns:
        (..., H, W) bool, True where no band holds ``sentinel`` (nor NaN).
    """
    if math.isnan(sentinel):
        return ~image.isnan().any(dim=-3)
    if not image.is_floating_point():
        # An int keeps the comparison in the image's dtype: against a float, torch would
        # compare in float32, which merges large neighbouring integers (uint32, int32).
        return (image != int(sentinel)).all(dim=-3)
    # NaN is never data (the validity rule of geocmid.raster.files.ValidityRule).
    return ((image != sentinel) & ~image.isnan()).all(dim=-3)


def restore_on_device(
    batch: Sample, sentinel: float | None, ignore_index: int | None = None
) -> Sample:
    """Finish on the device a batch read with :data:`DEVICE_READ`: float32 image, ``valid``.

    Args:
        batch: ``image`` (B, C, H, W) in the files' dtype, ``valid`` (B, H, W) unless it was
            left out, optionally ``mask`` (B, H, W) class ids.
        sentinel: the dataset's :attr:`~GeoRasterDataset.sentinel`.
        ignore_index: label value given to ``mask`` where the rebuilt ``valid`` is False.

    Returns:
        The batch with a float32 image and ``valid`` (when the sentinel or the dataset gave it).
    """
    if 'valid' not in batch and sentinel is not None:
        valid = batch['valid'] = valid_from_sentinel(batch['image'], sentinel)
        if ignore_index is not None and 'mask' in batch:
            batch['mask'] = batch['mask'].masked_fill(~valid, ignore_index)
    batch['image'] = batch['image'].to(torch.float32)
    return batch
