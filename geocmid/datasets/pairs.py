"""Image pairs for change detection: the second image read on the first one's grid.

:func:`align_pair` checks a (before, after) pair and returns an :class:`AlignedPair`, which
reads both images by windows of one grid: the before image's own grid (CRS, resolution and
pixel alignment) over the pair's overlap. The after image is read directly when that grid is a
window of its own grid and through a virtual warp (:class:`~rasterio.vrt.WarpedVRT`) otherwise,
following TorchGeo's ``IntersectionDataset`` (dataset 2 takes dataset 1's CRS and resolution).
Nothing is read until a window is asked for.

This module also lists pairs: a CSV file, or a LEVIR-CD or SZTAKI AirChange folder.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetReader
from rasterio.transform import Affine, array_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.files import PathLike, open_raster, require_georeferencing
from geocmid.raster.grid import Grid, GridResampling, RasterOnGrid, data_bands, snap
from geocmid.raster.stats import BandStats, sample_windows
from geocmid.raster.units import crs_units_to_metres

#: Resampling of the after image when it has to be warped (bilinear suits continuous data).
PairResampling = GridResampling

#: Image extensions searched for in pair folders (case-insensitive).
IMAGE_SUFFIXES = ('.tif', '.tiff', '.png', '.jpg', '.jpeg', '.bmp', '.img')


class AlignedPair:
    """A before and an after image on one grid, read lazily by windows.

    Built by :func:`align_pair`. The grid is the before image's grid restricted to the pair's
    overlap: same CRS, float64 geotransform and pixel size, an integer window of the before
    image. A pixel is valid where both images hold data in every band read (the union of
    their nodata). A declared alpha band is not a data band: it marks validity.

    Attributes:
        before: the before (earlier) image file.
        after: the after (later) image file.
        grid: the common grid.
        before_grid: the before image's whole grid.
        window: where the grid lies in the before image (pixels).
        count: number of data bands of each image (alpha bands left out).
        dtype: data type of both images.
    """

    def __init__(
        self,
        before: RasterOnGrid,
        after: RasterOnGrid,
        grid: Grid,
        window: Window,
    ) -> None:
        self._before = before
        self._after = after
        self.before = before.path
        self.after = after.path
        self.grid = grid
        src = before.src
        self.before_grid = Grid(src.crs, src.transform, src.width, src.height)
        self.window = window
        self._bands = (data_bands(before.src), data_bands(after.src))
        self.count = len(self._bands[0])
        self.dtype = np.dtype(before.src.dtypes[self._bands[0][0] - 1])

    @property
    def crs(self) -> CRS | None:
        """CRS of the grid (None for a pair without georeferencing)."""
        return self.grid.crs

    @property
    def transform(self) -> Affine:
        """float64 geotransform of the grid."""
        return self.grid.transform

    @property
    def width(self) -> int:
        """Grid width in pixels."""
        return self.grid.width

    @property
    def height(self) -> int:
        """Grid height in pixels."""
        return self.grid.height

    @property
    def ground_resolution(self) -> float | None:
        """Pixel size in metres (x direction); None without georeferencing."""
        if self.grid.crs is None:
            return None
        bounds = array_bounds(self.height, self.width, self.transform)
        return crs_units_to_metres(abs(self.transform.a), self.grid.crs, bounds)

    @property
    def band_names(self) -> tuple[list[str | None], list[str | None]]:
        """Descriptions of each image's data bands, before then after (None where unnamed)."""
        before, after = (
            [raster.src.descriptions[band - 1] for band in bands]
            for raster, bands in zip((self._before, self._after), self._bands, strict=True)
        )
        return before, after

    @property
    def warped(self) -> bool:
        """Whether the after image is resampled (else it shares the before image's pixels)."""
        return self._after.warped

    def read(
        self,
        window: Window | None = None,
        *,
        indexes: Sequence[int] | None = None,
        out_dtype: str | np.dtype | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read both images in a window of the grid.

        Args:
            window: pixels of the grid; None reads the whole grid (small pairs only).
            indexes: 1-based data bands to read (alpha bands are not counted); all when None.
            out_dtype: data type to read into; the images' own when None.

        Returns:
            ``(before, after, valid)``: (C, h, w) arrays and the (h, w) bool union validity.
        """
        window = Window(0, 0, self.width, self.height) if window is None else window
        indexes = tuple(range(1, self.count + 1)) if indexes is None else tuple(indexes)
        first, second = ([bands[i - 1] for i in indexes] for bands in self._bands)
        before, valid_before = self._before.read(window, first, out_dtype)
        after, valid_after = self._after.read(window, second, out_dtype)
        return before, after, valid_before & valid_after

    def close(self) -> None:
        """Close both images."""
        self._before.close()
        self._after.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_image(path: PathLike) -> DatasetReader:
    """Open a raster with :func:`~geocmid.raster.files.open_raster`, quietly.

    GDAL warns about images without georeferencing; PNG and JPEG training pairs are expected
    to lack it, and a missing CRS is checked explicitly where it matters.
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NotGeoreferencedWarning)
        return open_raster(path)


def is_georeferenced(src: DatasetReader) -> bool:
    """Whether ``src`` has both a CRS and an affine geotransform."""
    return src.crs is not None and src.transform != Affine.identity()


def _compatible_dtypes(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two images' data types can be compared: identical, or floats of any width.

    Integers of different widths usually carry different radiometric scales (8-bit versus
    16-bit), which a model cannot compare.
    """
    if tuple(a) == tuple(b):
        return True
    return all(np.dtype(x).kind == 'f' for x in (*a, *b))


def overlap_window(
    before: DatasetReader, after: DatasetReader, before_path: PathLike, after_path: PathLike
) -> Window:
    """The window of ``before`` covered by ``after``'s footprint, snapped outward to whole pixels.

    ``after``'s bounds are taken into ``before``'s CRS (densified, so a curved reprojected edge
    is enclosed). Pixels of the window that ``after`` does not actually cover are invalid when
    read (see :class:`AlignedPair`).

    Raises:
        InputError: the footprints do not overlap.
    """
    bounds = after.bounds
    if after.crs != before.crs:
        bounds = transform_bounds(after.crs, before.crs, *bounds, densify_pts=21)
    left, bottom, right, top = bounds
    inverse = ~before.transform
    corners = [inverse @ (x, y) for x in (left, right) for y in (bottom, top)]
    cols = [snap(c) for c, _ in corners]
    rows = [snap(r) for _, r in corners]
    col0, col1 = max(0, math.floor(min(cols))), min(before.width, math.ceil(max(cols)))
    row0, row1 = max(0, math.floor(min(rows))), min(before.height, math.ceil(max(rows)))
    if col1 <= col0 or row1 <= row0:
        b = ', '.join(f'{v:.12g}' for v in before.bounds)
        a = ', '.join(f'{v:.12g}' for v in bounds)
        raise InputError(
            after_path, f'no overlap with {before_path} (bounds {a} in its CRS versus {b})'
        )
    return Window(col0, row0, col1 - col0, row1 - row0)


def align_pair(
    before: PathLike,
    after: PathLike,
    *,
    nodata: float | None = None,
    resampling: PairResampling = 'bilinear',
    allow_ungeoreferenced: bool = False,
) -> AlignedPair:
    """Put the after image on the before image's grid over their overlap.

    The grid keeps the before image's CRS, float64 geotransform and pixel alignment; it covers
    the part of the before image that the after image's footprint overlaps. The after image
    is warped onto it (``resampling``) unless it already shares those pixels, in which case it
    is read as is. Only the file headers are read here.

    Args:
        before: the earlier image (any raster GDAL reads: GeoTIFF, ENVI, ...).
        after: the later image.
        nodata: overrides or supplies the nodata value of both images.
        resampling: how the after image is resampled when it must be warped.
        allow_ungeoreferenced: accept a pair in which neither image is georeferenced (PNG or
            JPEG training pairs); both must then have the same size and are used pixel for pixel.

    Returns:
        The aligned pair; close it (or use it as a context manager) when done.

    Raises:
        InputError: a missing or unreadable file, an image without CRS or geotransform, a
            band-count or data-type mismatch, or no overlap. The message names the file.
    """
    before, after = Path(before), Path(after)
    opened: list[DatasetReader] = []
    try:
        a = open_image(before)
        opened.append(a)
        b = open_image(after)
        opened.append(b)
        if allow_ungeoreferenced and not is_georeferenced(a) and not is_georeferenced(b):
            if (a.width, a.height) != (b.width, b.height):
                raise InputError(
                    after,
                    f'is {b.width} x {b.height} px but {before} is {a.width} x {a.height} px; '
                    'images without georeferencing must have the same size',
                )
            window = Window(0, 0, a.width, a.height)
            grid = Grid(None, Affine.identity(), a.width, a.height)
        else:
            require_georeferencing(a, before)
            require_georeferencing(b, after)
            window = None
        bands_a, bands_b = data_bands(a), data_bands(b)
        if len(bands_b) != len(bands_a):
            raise InputError(after, f'has {len(bands_b)} band(s) but {before} has {len(bands_a)}')
        dtypes_a = [a.dtypes[i - 1] for i in bands_a]
        dtypes_b = [b.dtypes[i - 1] for i in bands_b]
        if not _compatible_dtypes(dtypes_a, dtypes_b):
            raise InputError(
                after,
                f'data type {dtypes_b[0]} does not match {dtypes_a[0]} of {before}; '
                'convert one image so that both share a data type',
            )
        if window is None:
            window = overlap_window(a, b, before, after)
            grid = Grid(a.crs, a.window_transform(window), int(window.width), int(window.height))
        first = RasterOnGrid(a, before, grid, nodata=nodata, resampling=resampling)
        second = RasterOnGrid(b, after, grid, nodata=nodata, resampling=resampling)
    except BaseException:
        for src in opened:
            src.close()
        raise
    return AlignedPair(first, second, grid, window)


@dataclass(frozen=True)
class PairRecord:
    """One listed pair.

    Attributes:
        before: the earlier image.
        after: the later image.
        label: the change label raster, if any.
        name: a name for the pair's outputs, unique in its list.
        source: where it was listed (``pairs.csv:3``, a folder), for error messages.
    """

    before: Path
    after: Path
    label: Path | None = None
    name: str = ''
    source: str = ''

    def check_files(self) -> None:
        """Raise unless every file of the pair exists.

        Raises:
            InputError: naming the pair and the missing file.
        """
        for role, path in (('before', self.before), ('after', self.after), ('label', self.label)):
            if path is not None and not path.is_file():
                raise InputError(self.source or self.name, f'{role} file {path} not found')


def read_pairs(path: PathLike, *, labels: bool = False) -> list[PairRecord]:
    """List the pairs of a CSV file or of a folder.

    A CSV has a header with the columns ``before`` and ``after`` (and ``label`` when
    ``labels``), and optionally ``name``; relative paths are relative to the CSV's folder. A
    folder holds either ``A/``, ``B/`` and ``label/`` with the same file names in each
    (LEVIR-CD), or one subfolder per pair with ``im1``, ``im2`` and ``gt`` images (SZTAKI
    AirChange). Files are not checked here (see :meth:`PairRecord.check_files`), so that one
    missing file fails its pair only.

    Args:
        path: the CSV file or the folder.
        labels: require a label for every pair.

    Returns:
        The pairs in listed (CSV) or sorted (folder) order, with unique names.

    Raises:
        InputError: a missing path, a missing column or empty cell, or a folder of neither
            layout.
    """
    path = Path(path)
    if path.is_dir():
        records = _folder_pairs(path, labels)
    elif path.is_file():
        records = _csv_pairs(path, labels)
    else:
        raise InputError(path, 'no such file or folder')
    if not records:
        raise InputError(path, 'lists no pairs')
    return records


def _csv_pairs(path: Path, labels: bool) -> list[PairRecord]:
    required = ('before', 'after', 'label') if labels else ('before', 'after')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f'cannot read pair list ({exc})') from None
    if not rows:
        raise InputError(path, 'is empty; expected a header with columns before,after')
    header = [cell.strip().lower() for cell in rows[0]]
    missing = [column for column in required if column not in header]
    if missing:
        raise InputError(
            path, f'missing column(s) {", ".join(missing)} (header: {",".join(header) or "empty"})'
        )
    column = {name: header.index(name) for name in (*required, 'name') if name in header}
    records, names = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        source = f'{path}:{line}'
        cells = {name: row[i].strip() if i < len(row) else '' for name, i in column.items()}
        for name in required:
            if not cells[name]:
                raise InputError(source, f'empty {name!r} cell')
        before, after = (path.parent / cells['before'], path.parent / cells['after'])
        label = path.parent / cells['label'] if cells.get('label') else None
        name = cells.get('name') or f'{before.stem}_{after.stem}'
        if name in names:
            if cells.get('name'):
                raise InputError(source, f'duplicate pair name {name!r}')
            name = f'{name}_{line}'
        names.add(name)
        records.append(PairRecord(before, after, label, name, source))
    return records


def _images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.')
    }


def _subfolder(path: Path, name: str) -> Path | None:
    """The subfolder called ``name`` whatever its case, if any."""
    for child in path.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def _folder_pairs(path: Path, labels: bool) -> list[PairRecord]:
    a, b, label = (_subfolder(path, name) for name in ('A', 'B', 'label'))
    if a is not None and b is not None:
        befores, afters = _images(a), _images(b)
        gts = _images(label) if label is not None else {}
        records = []
        for stem, before in befores.items():
            if stem not in afters:
                raise InputError(before, f'has no counterpart in {b}')
            if labels and stem not in gts:
                raise InputError(before, f'has no label in {label or path / "label"}')
            records.append(PairRecord(before, afters[stem], gts.get(stem), stem, str(path)))
        return records
    records = []
    for folder in sorted({p.parent for p in path.rglob('im1.*')}):
        images = {stem.lower(): p for stem, p in _images(folder).items()}
        if 'im1' not in images:
            continue
        if 'im2' not in images:
            raise InputError(folder, 'has im1 but no im2 image')
        if labels and 'gt' not in images:
            raise InputError(folder, 'has no gt label image')
        name = '_'.join(folder.relative_to(path).parts) or folder.name
        record = PairRecord(images['im1'], images['im2'], images.get('gt'), name, str(folder))
        records.append(record)
    if not records:
        raise InputError(
            path,
            'holds neither A/, B/ (and label/) subfolders (LEVIR-CD layout) nor folders with '
            'im1, im2 (and gt) images (SZTAKI AirChange layout)',
        )
    return records


def pair_statistics(
    pair: AlignedPair,
    indexes: Sequence[int],
    *,
    rows: tuple[int, int] | None = None,
    max_pixels: int = 2**20,
    seed: int = 0,
) -> BandStats:
    """Per-band statistics of the valid pixels of both images of a pair.

    Windows of 256 px are sampled within a budget of ``max_pixels``, so a large pair is not
    read whole.

    Args:
        pair: the aligned pair.
        indexes: 1-based bands.
        rows: first and last (exclusive) grid row to sample; all rows when None.
        max_pixels: pixel budget.
        seed: seed of the sampled windows.
    """
    first, last = rows or (0, pair.height)
    rng = np.random.default_rng(seed)
    windows, _ = sample_windows(last - first, pair.width, (256, 256), max_pixels, rng)
    total = BandStats.empty(len(indexes))
    for window in windows:
        window = Window(window.col_off, window.row_off + first, window.width, window.height)
        before, after, valid = pair.read(window, indexes=indexes)
        total = total.merge(BandStats.from_pixels(before, valid))
        total = total.merge(BandStats.from_pixels(after, valid))
    return total
