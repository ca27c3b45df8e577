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
from typing import Literal, Self

import numpy as np
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from geocmid.errors import InputError
from geocmid.raster.files import PathLike, ValidityRule, open_raster, require_georeferencing
from geocmid.raster.stats import BandStats, sample_windows

#: Resampling of the after image when it has to be warped (bilinear suits continuous data).
PairResampling = Literal['nearest', 'bilinear', 'cubic', 'average']

#: Image extensions searched for in pair folders (case-insensitive).
IMAGE_SUFFIXES = ('.tif', '.tiff', '.png', '.jpg', '.jpeg', '.bmp', '.img')

# Coordinates closer than this to a whole pixel count as on it: float64 geotransforms of
# aligned grids differ by rounding noise, which must not add a column of nodata.
_PIXEL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS (None for images without georeferencing), geotransform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int


def _snap(value: float) -> float:
    """``value`` rounded to a whole number when it is one up to rounding noise."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < _PIXEL_TOLERANCE else value


def _grid_offset(src: DatasetReader, grid: Grid) -> tuple[int, int] | None:
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
    (col0, row0), (col1, row1), (col2, row2) = [(_snap(c), _snap(r)) for c, r in corners]
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
        nodata: float | None,
        resampling: PairResampling,
        offset: tuple[int, int] | None = None,
    ) -> None:
        self.src = src
        self.path = path
        self.nodata = nodata
        if offset is None:
            offset = _grid_offset(src, grid)
        self.warp: WarpedVRT | None = None
        if offset is None:
            # The alpha band marks what the warp could not fill: outside the raster's footprint
            # and wherever its nodata value or mask made the resampling kernel empty.
            self.warp = WarpedVRT(
                src,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling[resampling],
                add_alpha=True,
                src_nodata=src.nodata if nodata is None else nodata,
                nodata=src.nodata if nodata is None else nodata,
            )
            offset = (0, 0)
        self.row_off, self.col_off = offset

    @property
    def warped(self) -> bool:
        """Whether the raster is resampled onto the grid (else read pixel for pixel)."""
        return self.warp is not None

    def read(
        self, window: Window, indexes: Sequence[int], out_dtype: str | np.dtype | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read ``indexes`` in ``window`` of the grid: (C, h, w) data and (h, w) validity."""
        if self.warp is not None:
            data = self.warp.read(list(indexes), window=window, out_dtype=out_dtype)
            valid = self.warp.read(self.warp.count, window=window) > 0  # the added alpha band
            if self.warp.nodata is not None:
                rule = ValidityRule(nodata=self.warp.nodata)
                valid &= rule.valid(self.warp, indexes, window, data)
        else:
            col, row = window.col_off + self.col_off, window.row_off + self.row_off
            shifted = Window(col, row, window.width, window.height)
            data = self.src.read(list(indexes), window=shifted, out_dtype=out_dtype)
            rule = ValidityRule.of(self.src, indexes, self.nodata)
            valid = rule.valid(self.src, indexes, shifted, data)
        if data.dtype.kind == 'f':  # NaN is never data, whatever the metadata says
            valid &= ~np.isnan(data).any(axis=0)
        return data, valid

    def close(self) -> None:
        """Close the warp (if any) and the raster."""
        if self.warp is not None:
            self.warp.close()
        self.src.close()


class AlignedPair:
    """A before and an after image on one grid, read lazily by windows.

    Built by :func:`align_pair`. The grid is the before image's grid restricted to the pair's
    overlap: same CRS, float64 geotransform and pixel size, an integer window of the before
    image. A pixel is valid where both images hold data in every band read (the union of
    their nodata).

    Attributes:
        before: the before (earlier) image file.
        after: the after (later) image file.
        grid: the common grid.
        before_grid: the before image's whole grid.
        window: where the grid lies in the before image (pixels).
        count: number of bands of each image.
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
        self.count = before.src.count
        self.dtype = np.dtype(before.src.dtypes[0])

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
            indexes: 1-based bands to read; all bands when None.
            out_dtype: data type to read into; the images' own when None.

        Returns:
            ``(before, after, valid)``: (C, h, w) arrays and the (h, w) bool union validity.
        """
        window = Window(0, 0, self.width, self.height) if window is None else window
        indexes = tuple(range(1, self.count + 1)) if indexes is None else tuple(indexes)
        before, valid_before = self._before.read(window, indexes, out_dtype)
        after, valid_after = self._after.read(window, indexes, out_dtype)
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
    cols = [_snap(c) for c, _ in corners]
    rows = [_snap(r) for _, r in corners]
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
        if b.count != a.count:
            raise InputError(after, f'has {b.count} band(s) but {before} has {a.count}')
        if not _compatible_dtypes(a.dtypes, b.dtypes):
            raise InputError(
                after,
                f'data type {b.dtypes[0]} does not match {a.dtypes[0]} of {before}; '
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
